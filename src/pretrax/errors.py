"""The one base of every error pretrax expects: the command line prints its message as one line
and exits 2, so a new error class can never end in a traceback instead."""


class PretraxError(Exception):
  """An expected failure; the message names the problem and the fix."""
