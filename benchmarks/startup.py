"""Start-up cost vs dataset size: time from process start to the first optimizer step, and peak memory.

    python benchmarks/startup.py --workdir /tmp/startup-bench                         # 1k and 50k images
    python benchmarks/startup.py --workdir /tmp/startup-bench --sizes 1000 50000 --compare /path/to/other/checkout

For each size it writes a dataset of tiny images (the bytes of one encoded 32 px PNG, copied; a caption beside
each; 1,000 per folder), then runs `python train2.py` on a tiny random BLIP (caption_train/tiny.py) with batch 1,
no DataLoader workers, no tracker, no sample captions. It watches the child's stderr for the progress bar's
"1/N", i.e. the end of the first optimizer step, notes the time since the child was started, then kills it
(SIGKILL) and reads its peak RSS (ru_maxrss from wait4). Also timed: when the dataset summary line appears.
`--compare PATH` runs the same against another checkout of caption-train (e.g. the code before a change).

What it measures is what grows with the dataset (walking, reading captions, building samples, the dataset
summary, the split and the sampler); the rest (Python start, imports, model load) is the same for every size.
Numbers are wall-clock on whatever else the machine is doing: compare sizes within one run.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(rb"training:[^\r\n]*?\b1/\d+")
PER_FOLDER = 1000


def tiny_png() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (240, 240, 240))
    ImageDraw.Draw(image).ellipse([8, 8, 24, 24], fill=(215, 35, 35))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_dataset(root: Path, n: int) -> float:
    """n copies of one PNG with captions, PER_FOLDER per folder; returns seconds taken."""
    from caption_train.tiny import COLORS, SHAPES

    start = time.perf_counter()
    data = tiny_png()
    captions = [f"a {color} {shape}".encode() for color in COLORS for shape in SHAPES]
    for i in range(n):
        folder = root / f"part{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
        with open(folder / f"img{i:07d}.png", "wb") as handle:
            handle.write(data)
        with open(folder / f"img{i:07d}.txt", "wb") as handle:
            handle.write(captions[i % len(captions)])
    return time.perf_counter() - start


def run_to_first_step(repo: Path, dataset: Path, model: Path, output: Path, timeout: float) -> dict[str, float]:
    """Start train2.py from `repo`, return {first_step_s, summary_s, peak_rss_mb}; kill it after the first step."""
    cmd = [sys.executable, str(repo / "train2.py"), "--dataset_dir", str(dataset), "--model_name_or_path", str(model),
           "--output_dir", str(output), "--epochs", "1", "--batch_size", "1", "--num_workers", "0", "--log_with", "none",
           "--num_sample_captions", "0", "--save_every_n_epochs", "0"]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    marks: dict[str, float] = {}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()
    lines: list[str] = []

    def watch_stdout() -> None:
        for line in child.stdout:
            if line.startswith(b"dataset ") and "summary_s" not in marks:
                marks["summary_s"] = time.perf_counter() - start
            lines.append(line.decode("utf-8", "replace").rstrip())

    def watch_stderr() -> None:
        tail = b""
        while chunk := child.stderr.read1(65536):
            tail = (tail + chunk)[-4096:]
            if FIRST_STEP.search(tail):
                marks["first_step_s"] = time.perf_counter() - start
                done.set()
                return
        done.set()  # the child ended without a first step

    threads = [threading.Thread(target=watch_stdout, daemon=True), threading.Thread(target=watch_stderr, daemon=True)]
    for thread in threads:
        thread.start()
    done.wait(timeout)
    child.send_signal(signal.SIGKILL)
    _, _, usage = os.wait4(child.pid, 0)
    child.returncode = -9
    if "first_step_s" not in marks:
        tail = child.stderr.read().decode("utf-8", "replace")[-2000:]
        raise SystemExit(f"no first step from {repo} on {dataset} within {timeout:.0f} s; stdout: {lines[-5:]}; stderr: {tail}")
    marks["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    marks["summary"] = next((line for line in lines if line.startswith("dataset ")), "")
    return marks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="where datasets, the model and runs go (default: a temp dir, removed after)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000], help="dataset sizes in images (default: 1000 50000)")
    parser.add_argument("--compare", default=None, help="another caption-train checkout to run the same way (e.g. before a change)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for a first step")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from caption_train.tiny import COLORS, SHAPES, build_tiny_blip

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="startup-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = build_tiny_blip(workdir / "model", [f"a {c} {s}" for c in COLORS for s in SHAPES], image_size=32, patch_size=16,
                                hidden_size=64, num_layers=2, num_heads=2, max_position_embeddings=32)
        datasets = {}
        for n in args.sizes:
            datasets[n] = workdir / f"data-{n}"
            if not datasets[n].exists():
                print(f"writing {n:,} images: {make_dataset(datasets[n], n):.1f} s", flush=True)
        repos = {"this checkout": REPO, **({"compare": Path(args.compare).resolve()} if args.compare else {})}
        results: dict[str, dict[int, dict[str, float]]] = {}
        for label, repo in repos.items():
            results[label] = {}
            for n in args.sizes:
                marks = run_to_first_step(repo, datasets[n], model, workdir / "runs" / label.replace(" ", "-") / str(n), args.timeout)
                results[label][n] = marks
                print(f"{label} ({repo}), {n:>9,} images: first step at {marks['first_step_s']:6.2f} s "
                      f"(dataset summary printed at {marks.get('summary_s', float('nan')):6.2f} s), peak RSS {marks['peak_rss_mb']:7.1f} MB", flush=True)
                print(f"    {marks['summary']}", flush=True)
        small, large = min(args.sizes), max(args.sizes)
        if small == large:
            return
        print(f"\ngrowth from {small:,} to {large:,} images, and the straight-line cost of 1,000,000:")
        for label, by_size in results.items():
            dt = by_size[large]["first_step_s"] - by_size[small]["first_step_s"]
            dm = by_size[large]["peak_rss_mb"] - by_size[small]["peak_rss_mb"]
            per_image_ms, per_image_kb = 1000 * dt / (large - small), 1024 * dm / (large - small)
            million_s = by_size[small]["first_step_s"] + dt / (large - small) * (1_000_000 - small)
            million_mb = by_size[small]["peak_rss_mb"] + dm / (large - small) * (1_000_000 - small)
            print(f"  {label}: +{dt:.2f} s, +{dm:.0f} MB ({per_image_ms:.3f} ms and {per_image_kb:.2f} KB per image); "
                  f"1M images: first step at ~{million_s:.0f} s, peak RSS ~{million_mb:.0f} MB")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
