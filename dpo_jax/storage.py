"""The one path layer: local paths and object-storage URLs (gs://, s3://, ...) for everything a run touches.

Every path a run or a command takes (workdir, data files and dirs, tokenizer, init_from_hf,
init_from, the reference cache, export --out, scorer model dirs) goes through here, via
`etils.epath`, which reaches object stores through fsspec (gcsfs for gs://). Orbax checkpoints
take the same URLs (TensorStore writes their arrays), and TFDS its data_dir.

Writes cannot tear: a local file is written beside its path and renamed over it; an object is
uploaded whole (object stores make an upload visible at once or not at all). A write that fails
(a full disk) leaves the file as it was and no temporary file, and raises an OSError naming the
path. Object stores cannot append, so writers that append locally (metrics.jsonl) rewrite the
object instead (`metrics`).
Readers that need a local file (tokenizers, safetensors, Hugging Face checkpoints) get a local copy
of a remote path (`local_copy`). `only_process_zero` writes skip every other process of a
multi-process run, which computes the same content.
"""

import atexit
import hashlib
import json
import os
import shutil
import tempfile

import jax
from etils import epath


def is_remote(path):
    """True for a URL with a scheme (gs://bucket/x), False for a local path."""
    return "://" in os.fspath(path)


def as_path(path):
    """An `etils.epath.Path` of a local path or URL."""
    return epath.Path(path)


def join(path, *parts):
    """`os.path.join` that keeps a URL's scheme."""
    return os.fspath(as_path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def absolute(path):
    """`os.path.abspath` of a local path; a URL as it is."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def exists(path):
    return as_path(path).exists()


def isdir(path):
    return as_path(path).is_dir()


def isfile(path):
    return as_path(path).is_file()


def makedirs(path):
    as_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path):
    """Names in a directory ([] if it does not exist)."""
    directory = as_path(path)
    return sorted(child.name for child in directory.iterdir()) if directory.is_dir() else []


def glob(directory, pattern):
    """Paths in `directory` matching the glob `pattern` (relative to it), sorted."""
    return sorted(os.fspath(match) for match in as_path(directory).glob(pattern))


def file_digest(path, *, chunk_bytes=1 << 20):
    """sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_under(directory):
    """Every file below `directory`, recursively (a listing per directory: object stores refuse `**`)."""
    files = []
    for child in sorted(as_path(directory).iterdir()):
        files += files_under(child) if child.is_dir() else [child]
    return files


def move(source, target):
    """Moves a file or directory (on object storage: copies, then deletes)."""
    if is_remote(source) or is_remote(target):  # object stores have no folders to rename
        source_path = as_path(source)
        if source_path.is_dir():
            for item in files_under(source_path):
                item.copy(as_path(target).joinpath(os.path.relpath(os.fspath(item), os.fspath(source_path))))
            source_path.rmtree()
        else:
            source_path.copy(as_path(target))
            source_path.unlink()
    else:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.move(source, target)


def open_file(path, mode="r"):
    """A file object of a local path or URL (text modes decode UTF-8)."""
    return as_path(path).open(mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _atomic_write(path, write, mode):
    """Calls `write(file)` on a temporary file renamed to `path` when complete (an object: its upload).
    An OSError is raised naming `path`: one from `write` or `close` (a full disk) names no file."""
    temporary = None
    try:
        if is_remote(path):
            with open_file(path, mode) as f:  # one upload, visible when complete
                write(f)
            return
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = f"{path}.tmp"
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            try:
                os.remove(temporary)
            except OSError:  # never created, or the disk refuses this too: the error to report is `error`
                pass
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path)) from error
        raise


def _skipped(only_process_zero):
    return only_process_zero and jax.process_index() != 0


def write_text(path, text, *, only_process_zero=True):
    """Writes `text` to `path` atomically."""
    if not _skipped(only_process_zero):
        _atomic_write(path, lambda f: f.write(text), "w")


def write_json(path, value, *, only_process_zero=True, **dump_options):
    """Writes `value` as JSON (indented, keys sorted unless `sort_keys=False`) to `path` atomically."""
    if not _skipped(only_process_zero):
        options = {"indent": 2, "sort_keys": True, **dump_options}
        _atomic_write(path, lambda f: json.dump(value, f, **options), "w")


def write_jsonl(path, records, *, only_process_zero=True):
    """Writes one JSON object per line to `path` atomically."""
    if not _skipped(only_process_zero):
        _atomic_write(path, lambda f: f.writelines(json.dumps(record) + "\n" for record in records), "w")


def write_bytes(path, write, *, only_process_zero=True):
    """Calls `write(binary file)` on a temporary file (or the object's upload), then puts it at `path`."""
    if not _skipped(only_process_zero):
        _atomic_write(path, write, "wb")


def read_text(path):
    with open_file(path) as f:
        return f.read()


def read_json(path):
    """The JSON value of `path`, with the file named in the error if it does not parse."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------
# Local copies, for libraries that read local files only
# ---------------------------------------------------------------------------------------------

_LOCAL_COPIES = {}  # (url, names) -> local copy, for this process


def _copies_directory():
    if "directory" not in _LOCAL_COPIES:
        directory = tempfile.mkdtemp(prefix="dpo_jax_copies_")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _LOCAL_COPIES["directory"] = directory
    return _LOCAL_COPIES["directory"]


def local_copy(path, names=None):
    """A local path holding what `path` holds: `path` itself when local, else a copy of the remote
    file or directory (tree; with `names`, only those of its files), downloaded once per process
    into a temporary directory removed at exit."""
    path = os.fspath(path)
    if not is_remote(path):
        return path
    key = (path, tuple(sorted(names)) if names else None)
    if key in _LOCAL_COPIES:
        return _LOCAL_COPIES[key]
    source = as_path(path)
    target = os.path.join(_copies_directory(), hashlib.sha256(repr(key).encode()).hexdigest()[:16], source.name)
    if source.is_dir():
        os.makedirs(target)  # a directory of none of `names` is an empty directory
        items = [source / name for name in names] if names else files_under(source)
        for item in items:
            if item.is_file():
                local = os.path.join(target, os.path.relpath(os.fspath(item), os.fspath(source)))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                item.copy(local, overwrite=True)
    elif source.is_file():
        os.makedirs(os.path.dirname(target))
        source.copy(target, overwrite=True)
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    _LOCAL_COPIES[key] = target
    return target


def upload_tree(local_directory, path):
    """Copies a local directory's files to `path` (a local directory or a URL)."""
    for root, _, files in os.walk(local_directory):
        for name in files:
            local = os.path.join(root, name)
            target = as_path(path).joinpath(os.path.relpath(local, local_directory))
            target.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(local).copy(target, overwrite=True)
