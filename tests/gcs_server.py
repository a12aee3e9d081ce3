"""A local Google Cloud Storage for tests: gcp-storage-emulator, plus what TensorStore needs of it.

Usage: python tests/gcs_server.py PORT BUCKET. Clients reach it through STORAGE_EMULATOR_HOST
(gcsfs, google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (Orbax's TensorStore).

The emulator stores objects but ignores the generation preconditions that TensorStore's
read-modify-write depends on (OCDBT's manifest is written with `ifGenerationMatch`, re-read with
`ifGenerationNotMatch`) and sends no `x-goog-generation` header with object data. Real GCS does
both; this wrapper adds them: 412 when `ifGenerationMatch` fails, 304 when `ifGenerationNotMatch`
matches, and the object's generation on every response that names one. It also serves each
connection on its own thread, one request at a time: the emulator's single thread would wait on an
idle keep-alive connection from a client the tests have frozen (SIGSTOP) and serve no one else.
"""

from http import HTTPStatus
import http.server
import sys
import threading

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str | None) -> int:
  """The object's current generation; 0 when it does not exist (GCS's convention)."""
  if not name:
    return 0
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except Exception:  # NotFound, or no such bucket.
    return 0


def _object_name(request) -> str | None:
  params = request.params or {}
  if params.get('object_id'):
    return params['object_id']
  names = request.query.get('name')
  if names:
    return names[0]
  if request.query.get('uploadType') == ['multipart']:  # The name is in the body's metadata.
    return request.data['meta'].get('name')
  return None


def with_preconditions(handler):
  """`handler` with GCS's generation preconditions checked first and the generation reported."""

  def handle(request, response, storage, *args, **kwargs):
    bucket, name = request.params.get('bucket_name'), _object_name(request)
    current = _generation(storage, bucket, name)
    match = request.query.get('ifGenerationMatch')
    not_match = request.query.get('ifGenerationNotMatch')
    if match and int(match[0]) != current:
      missing = current == 0 and handler is not objects.insert
      response.status = HTTPStatus.NOT_FOUND if missing else HTTPStatus.PRECONDITION_FAILED
      return None
    if not_match and int(not_match[0]) == current:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    result = handler(request, response, storage, *args, **kwargs)
    after = _generation(storage, bucket, name)
    if after:
      response['x-goog-generation'] = str(after)
    return result

  return handle


def one_at_a_time(handler, lock: threading.Lock):
  """A precondition's check and the write it guards happen as one step, as on GCS."""

  def handle(*args, **kwargs):
    with lock:
      return handler(*args, **kwargs)

  return handle


def patch_routes() -> None:
  checked = (objects.get, objects.download, objects.insert, objects.delete)
  lock = threading.Lock()
  for _, methods in server.HANDLERS:
    for method, fn in list(methods.items()):
      methods[method] = one_at_a_time(with_preconditions(fn) if fn in checked else fn, lock)
  server.server.HTTPServer = http.server.ThreadingHTTPServer  # The emulator's only server.


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  patch_routes()
  gcs = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
  gcs.run()


if __name__ == '__main__':
  main()
