"""Where a run's files live: a local directory or a bucket (`gs://`, `s3://`), one API for both.

Orbax writes checkpoints to either through TensorStore; everything else pretrax keeps in a workdir
(metrics, the tokenizer, the lock, damaged checkpoints) goes through `etils.epath`, which reaches
buckets with fsspec (gcsfs for `gs://`, the `gcs` extra). Local paths are made absolute once, so a
log line names the directory wherever the user was; bucket paths are left as written.
"""

import os

from etils import epath


def is_remote(path: str | epath.Path) -> bool:
  """True for a bucket path (`gs://bucket/dir`): no flock, no free-space figure, no append."""
  return '://' in str(path)


def path(location: str | epath.Path) -> epath.Path:
  """An epath.Path for a local path (made absolute) or a bucket path."""
  location = str(location)
  if is_remote(location):
    return epath.Path(location)
  return epath.Path(location).absolute()


def join(location: str | epath.Path, *parts: str) -> str:
  """`location/part/...` as a string, absolute when local (what Orbax and log lines take)."""
  return str(path(location).joinpath(*parts))


def move_tree(source: str | epath.Path, target: str | epath.Path) -> None:
  """Moves a directory to `target` (whose parent is created if need be). A bucket has neither
  directories nor renames: there every object is copied, then deleted."""
  if is_remote(source):
    import fsspec  # An etils dependency; gcsfs registers gs:// with it.

    fs, _ = fsspec.core.url_to_fs(str(source))
    fs.mv(str(source), str(target), recursive=True)
    return
  path(target).parent.mkdir(parents=True, exist_ok=True)
  path(source).rename(path(target))


def upload_tree(local_dir: str, target: str) -> None:
  """Copies a local directory's files to `target` (a bucket path), keeping their relative paths."""
  for root, _, files in os.walk(local_dir):
    for name in files:
      relative = os.path.relpath(os.path.join(root, name), local_dir)
      destination = path(target) / relative
      with open(os.path.join(root, name), 'rb') as f:
        destination.write_bytes(f.read())
