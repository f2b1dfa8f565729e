"""Time ``create_model(name, pretrained=True)`` first (download, check, convert, cache) and second
(from the cache: no request, no conversion) against ``load_pretrained`` of a converted folder.

ecaresnet50t with random weights in timm's Hub layout (``torch_reference.save_hub_folder``) is
served as ``timm/ecaresnet50t.ra2_in1k`` by the tests' local Hub (``tests/local_hub.py``, on
127.0.0.1: no network), with a fresh cache (HF_HOME) in a temporary directory. Also times the
one-line errors of an uncached model offline (HF_HUB_OFFLINE=1) and with the server gone.

    python benchmarks/pretrained_timing.py [--model ecaresnet50t] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # local_hub

from local_hub import LocalHub  # noqa: E402

import eca_flax  # noqa: E402
from eca_flax.errors import DownloadError  # noqa: E402
from eca_flax.models import torch_reference  # noqa: E402
from eca_flax.models.registry import model_info  # noqa: E402
from eca_flax.weights.convert import convert_file  # noqa: E402


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ecaresnet50t")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    info = model_info(args.model)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pretrained_timing."))
    folder = tmp / "hub_folder"
    torch_reference.save_hub_folder(
        args.model, torch_reference.random_reference(args.model), folder
    )
    hub = LocalHub()
    hub.add_folder(info.hub_repo(), folder)
    os.environ.update(HF_HOME=str(tmp / "hf"), HF_ENDPOINT=hub.url)
    os.environ.pop("HF_HUB_OFFLINE", None)
    quiet = lambda _: None
    converted, single = tmp / "converted", tmp / "converted.safetensors"
    convert_file(folder, converted, log=quiet)
    convert_file(folder, single, log=quiet)

    folder_cold = seconds(lambda: eca_flax.load_pretrained(converted))
    folder_warm = [
        seconds(lambda: eca_flax.load_pretrained(converted)) for _ in range(args.repeats)
    ]
    file_warm = [seconds(lambda: eca_flax.load_pretrained(single)) for _ in range(args.repeats)]
    first = seconds(lambda: eca_flax.create_model(args.model, pretrained=True))
    requests = len(hub.requests)
    second = [
        seconds(lambda: eca_flax.create_model(args.model, pretrained=True))
        for _ in range(args.repeats)
    ]
    assert len(hub.requests) == requests, "the second load made a request"

    def fails(name: str) -> float:
        start = time.perf_counter()
        try:
            eca_flax.create_model(name, pretrained=True)
        except DownloadError:
            return time.perf_counter() - start
        raise AssertionError(f"{name} loaded")

    os.environ["HF_HUB_OFFLINE"] = "1"
    offline = {n: fails(n) for n in ("ecaresnet50d", "eca_resnet50")}
    command = [sys.executable, "-m", "eca_flax.weights", "download", "ecaresnet50d"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    whole = time.perf_counter() - start
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    del os.environ["HF_HUB_OFFLINE"]
    hub.close()
    gone = {n: fails(n) for n in ("ecaresnet50d", "eca_resnet50")}

    folder_s, second_s = statistics.median(folder_warm), statistics.median(second)
    print(f"{args.model} ({info.params:,} params), local Hub at {hub.url}, cache {tmp / 'hf'}")
    print(f"load_pretrained(converted folder)       first {folder_cold:6.2f} s")
    print(f"load_pretrained(converted folder)      median {folder_s:6.2f} s  (x{args.repeats})")
    print(
        f"load_pretrained(converted .safetensors) median {statistics.median(file_warm):6.2f} s"
        f"  (x{args.repeats})"
    )
    print(f"create_model(pretrained=True) first           {first:6.2f} s  (download + convert)")
    print(
        f"create_model(pretrained=True) second   median {second_s:6.2f} s  (x{args.repeats}; "
        f"no request, no conversion)"
    )
    print(f"second / converted folder: {second_s / folder_s:.2f}x")
    for what, times in (("HF_HUB_OFFLINE=1", offline), ("server gone", gone)):
        shown = ", ".join(f"{n} {t:.2f} s" for n, t in times.items())
        print(f"uncached, {what}: error after {shown}")
    print(
        f"uncached, HF_HUB_OFFLINE=1, the whole command ({' '.join(command[1:])}, imports "
        f"included): {whole:.2f} s, exit 1, stderr: {done.stderr.strip()[:90]}..."
    )


if __name__ == "__main__":
    main()
