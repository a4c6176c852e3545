"""Renders the JobSet manifest of launch/gke_jobset.sh as JSON (which is YAML, and what kubectl reads).

Standard library only, for any python3. The container's arguments are the words after `--`, copied
into the manifest as JSON strings, so every argument (quotes, spaces, `$`, newlines, unicode) reaches
dpo_jax exactly as given.
  python3 launch/jobset_manifest.py --name=dpo-jax --image=IMAGE --tpu=ACCELERATOR --topology=4x4 \
      --hosts=4 --slices=1 --chips-per-host=4 -- --config=configs/quickstart.py --workdir=gs://b/r
"""

import argparse
import json
import re
import sys

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Characters a YAML reader refuses (C1 controls, non-characters) or reads as line breaks (NEL, U+2028,
# U+2029), and the byte-order mark: written as \uXXXX escapes, the rest of the text as UTF-8. (JSON's
# ensure_ascii would write characters beyond the BMP as surrogate pairs, which PyYAML does not join.)
_ESCAPE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def manifest(*, name, image, tpu, topology, hosts, slices, chips_per_host, args):
    """The JobSet: `slices` Jobs (one per slice) of `hosts` pods (one per TPU VM host) each."""
    container = {
        "name": "dpo-jax",
        "image": image,
        "command": ["dpo-jax"],  # the console script the image installs (launch/Dockerfile)
        "args": list(args),
        "resources": {"limits": {"google.com/tpu": chips_per_host}},
    }
    pod = {
        "restartPolicy": "Never",
        "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": tpu, "cloud.google.com/gke-tpu-topology": topology},
        "containers": [container],
    }
    job = {"parallelism": hosts, "completions": hosts, "backoffLimit": 0, "template": {"spec": pod}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": name,
            "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
        },
        "spec": {
            "failurePolicy": {"maxRestarts": 3},
            "replicatedJobs": [{"name": "slice", "replicas": slices, "template": {"spec": job}}],
        },
    }


def main(argv):
    options, args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="jobset_manifest.py", description=__doc__.splitlines()[0])
    for flag in ("--name", "--image", "--tpu", "--topology"):
        parser.add_argument(flag, required=True)
    for flag in ("--hosts", "--slices", "--chips-per-host"):
        parser.add_argument(flag, type=_positive, required=True)
    parsed = parser.parse_args(options)
    if not _DNS_LABEL.fullmatch(parsed.name) or len(parsed.name) > 63:
        parser.error(f"--name={parsed.name!r} is not a Kubernetes name (lower-case letters, digits, '-')")
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            parser.error(f"argument {arg!r} is not valid UTF-8, which a manifest needs")
    rendered = manifest(name=parsed.name, image=parsed.image, tpu=parsed.tpu, topology=parsed.topology,
                        hosts=parsed.hosts, slices=parsed.slices, chips_per_host=parsed.chips_per_host, args=args)
    text = _ESCAPE.sub(lambda match: f"\\u{ord(match.group()):04x}", json.dumps(rendered, indent=2, ensure_ascii=False))
    sys.stdout.buffer.write((text + "\n").encode("utf-8"))


if __name__ == "__main__":
    main(sys.argv[1:])
