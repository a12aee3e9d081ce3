"""What `import torch` finds in the pretrax processes the tests start (conftest.pretrax_env puts
this directory first on their PYTHONPATH): torch is not installed there, as on a user's machine.

torch is in the dev environment only for the test process to check exports against transformers;
pretrax never imports it. tensorboardX (behind MetricsWriter) tries to, for an optional tensor
type, and falls back to numpy without it: importing torch cost 3 to 5 s in every `pretrax train`.
"""

raise ImportError('torch is hidden from the pretrax processes that the tests start '
                  '(tests/hide_torch)')
