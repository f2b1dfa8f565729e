"""Pretrained models by name, in one call: download, check, convert and cache.

``create_model(name, pretrained=True)`` and ``load_pretrained(source)`` take

* a timm tag of a supported model, ``ecaresnet50t.ra2_in1k`` (``ecaresnet50t`` alone: its
  first tag, as timm does): timm's Hub repo ``timm/<model>.<tag>``;
* ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION``: any Hub repo in timm's layout
  (config.json + model.safetensors, sharded safetensors, or pytorch_model.bin), or one holding an
  eca_flax model file ``model.safetensors`` (``save_pretrained(model, "DIR/model.safetensors")``);
* an original model name, ``eca_resnet50``: the authors' released file from Google Drive;
  a COCO detector's name, ``mask_rcnn_ecanet50_k3377`` (``eca_flax.detection.load_detector``):
  the authors' mmdetection v1 file from Google Drive, converted whole;
* a local pretrained directory or .safetensors file, as ``pretrained.load_pretrained`` reads.

Hub files come through ``huggingface_hub.hf_hub_download`` one at a time, into the Hugging Face
cache (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, read at each call);
each blob's content is checked against the ETag that names it (sha256 for LFS files, git's
sha1 otherwise). Drive files come through ``gdown`` into ``<root>/eca_flax/drive`` (the same cache
root, ``HF_HOME`` by default; ``ECA_FLAX_CACHE`` moves eca_flax's folder) under a file lock, are
checked to be a checkpoint of the expected network before they are kept, and their sha256 is
recorded beside them and checked whenever they are read again. The converted model is cached as
one eca_flax .safetensors file (``<root>/eca_flax/converted``), so a second load makes no request
and converts nothing. Offline, or with the server unreachable, an uncached model fails at once
with one line saying how to get it. Neither huggingface_hub nor gdown is imported before a
download is needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import logging
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from eca_flax.errors import ConversionError, DownloadError, PretrainedError
from eca_flax.files import disk_full, one_line, write_file
from eca_flax.models import registry
from eca_flax.models.registry import ORIGINAL, TIMM, list_models, model_info
from eca_flax.version import __version__
from eca_flax.weights import hub
from eca_flax.weights.description import FORMAT, SAFETENSORS
from eca_flax.weights.pth import file_sha256

HUB_PREFIX = "hf-hub:"
DEFAULT_ENDPOINT = "https://huggingface.co"
DRIVE_URL_ENV = "ECA_FLAX_DRIVE_URL"  # a URL template with {id} standing in for Google Drive
CACHE_ENV = "ECA_FLAX_CACHE"  # eca_flax's own folder (default: <HF_HOME>/eca_flax)
PROBE_TIMEOUT_S = 1.5  # how long an unreachable server may take to say so
_HEX40, _HEX64 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")
_REPO = re.compile(r"[\w.-]+/[\w.-]+")
_TRUE = {"1", "on", "yes", "true"}

_logger = logging.getLogger("eca_flax.download")


# --------------------------------------------------------------------------------------------
# Names.


@dataclasses.dataclass(frozen=True)
class Source:
    """What a name means: ``kind`` "hub" (``repo``, ``revision``), "drive" (``arch``; a COCO
    detector's release name in ``detector``) or "local" (``path``); ``name`` is what the user
    wrote."""

    name: str
    kind: str
    repo: str = ""
    revision: str | None = None
    arch: str = ""
    path: Path | None = None
    detector: str = ""

    def drive_file(self) -> tuple[str, str]:
        """(the released file's name, its Google Drive id) of a "drive" source."""
        if self.detector:
            release = detector_release(self.detector)
            return release.checkpoint, release.drive_id
        info = model_info(self.arch)
        return info.checkpoint, info.drive_id

    def describe(self) -> str:
        """'ecaresnet26t: timm/ecaresnet26t.ra2_in1k on the Hugging Face Hub', 'eca_resnet50
        (eca_resnet50_k3557.pth.tar on Google Drive)'."""
        if self.kind == "hub":
            at = f"@{self.revision}" if self.revision else ""
            shown = "" if self.name == f"{HUB_PREFIX}{self.repo}{at}" else f"{self.name}: "
            return f"{shown}{self.repo}{at} on the Hugging Face Hub"
        if self.kind == "drive":
            return f"{self.name} ({self.drive_file()[0]} on Google Drive)"
        return str(self.path)


def detector_release(name: str) -> Any:
    """The COCO detector release (``detection.settings.Release``) ``name`` means, or None."""
    from eca_flax.detection.settings import release

    return release(name)


def released_names() -> list[str]:
    """Every name that downloads weights: the originals, each timm tag and its model alone, the
    COCO detectors."""
    from eca_flax.detection.settings import RELEASES

    names = [n for n in list_models(ORIGINAL) if model_info(n).drive_id] + list(RELEASES)
    for arch in list_models(TIMM):
        tags = model_info(arch).tag_names
        names += [arch, *(f"{arch}.{t}" for t in tags)] if tags else []
    return names


def parse_source(name: str | os.PathLike[str]) -> Source:
    """The ``Source`` a model name, ``hf-hub:`` repo or local path stands for; an unknown name
    is a one-line PretrainedError with the close names."""
    text = os.fspath(name)
    if text.startswith(HUB_PREFIX):
        repo, at, revision = text.removeprefix(HUB_PREFIX).partition("@")
        if not _REPO.fullmatch(repo) or (at and not revision):
            raise PretrainedError(
                f"{text}: not a Hub repo; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION"
            )
        return Source(text, "hub", repo=repo, revision=revision or None)
    path = Path(text).expanduser()
    if {"/", os.sep} & set(text) or text.endswith(SAFETENSORS) or text.startswith(("~", ".")):
        return Source(text, "local", path=path)  # a path, whatever it resembles
    arch, _, tag = text.partition(".")
    if arch in list_models():
        info = model_info(arch)
        if info.source == ORIGINAL and not tag:
            return Source(text, "drive", arch=arch)
        if info.source == TIMM and info.tags and (not tag or tag in info.tag_names):
            return Source(text, "hub", repo=info.hub_repo(tag or None), arch=arch)
        if info.source == TIMM and not info.tags:
            raise PretrainedError(f"{text}: timm published no pretrained weights for {arch}")
        if tag and not path.exists():
            tags = ", ".join(info.tag_names) or "none"
            raise PretrainedError(f"{text}: {arch} has no tag {tag!r} (its tags: {tags})")
    if path.exists():
        return Source(text, "local", path=path)
    if release := detector_release(text):
        return Source(text, "drive", arch=release.arch, detector=release.name)
    close = difflib.get_close_matches(text, released_names(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PretrainedError(
        f"{text}: unknown model name and no such file; {hint}python -m eca_flax.weights list "
        "shows the names"
    )


# --------------------------------------------------------------------------------------------
# Where things are cached, read at each call (huggingface_hub reads its variables at import).


@dataclasses.dataclass(frozen=True)
class Cache:
    """The Hugging Face hub cache and eca_flax's folder beside it."""

    hub: Path
    own: Path

    @classmethod
    def at(cls, cache_dir: str | os.PathLike[str] | None = None) -> Cache:
        """``cache_dir`` (a root: hub/ and eca_flax/ inside) or the environment's: ``HF_HUB_CACHE``
        (default ``$HF_HOME/hub``), ``ECA_FLAX_CACHE`` (default ``$HF_HOME/eca_flax``)."""
        if cache_dir is not None:
            root = Path(cache_dir).expanduser()
            return cls(root / "hub", root / "eca_flax")
        env = os.environ
        xdg = Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
        home = Path(env.get("HF_HOME") or xdg / "huggingface").expanduser()
        hub_dir = (
            Path(env["HF_HUB_CACHE"]).expanduser() if env.get("HF_HUB_CACHE") else home / "hub"
        )
        own = Path(env[CACHE_ENV]).expanduser() if env.get(CACHE_ENV) else home / "eca_flax"
        return cls(hub_dir, own)

    def repo_folder(self, repo: str) -> Path:
        """huggingface_hub's folder of a model repo: models--ORG--NAME."""
        return self.hub / ("models--" + repo.replace("/", "--"))

    def commit(self, repo: str, revision: str | None) -> str | None:
        """The cached commit of ``revision`` (a 40-hex revision is one), without a request."""
        revision = revision or "main"
        if _HEX40.fullmatch(revision):
            return revision
        try:
            text = (self.repo_folder(repo) / "refs" / revision).read_text().strip()
        except OSError:
            return None
        return text if _HEX40.fullmatch(text) else None

    def converted(self, source: Source, commit: str | None = None) -> Path:
        """Where the converted model of ``source`` is (or goes)."""
        if source.detector:  # a directory: model.json + weights.safetensors
            return self.own / "converted" / "drive" / source.detector
        if source.kind == "drive":
            stem = model_info(source.arch).checkpoint.removesuffix(".pth.tar")
            return self.own / "converted" / "drive" / f"{stem}{SAFETENSORS}"
        folder = self.own / "converted" / "hub" / source.repo.replace("/", "--")
        return folder / f"{commit}{SAFETENSORS}"

    def drive_file(self, source: Source) -> Path:
        """Where the authors' released file of a "drive" source is kept."""
        return self.own / "drive" / source.drive_file()[0]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _unreachable(url: str) -> str | None:
    """Why the server of ``url`` cannot be reached (within PROBE_TIMEOUT_S), or None: one TCP
    connection, so that no network fails at once instead of after huggingface_hub's retries.
    Behind a proxy (``*_PROXY`` set) nothing is probed."""
    parts = urllib.parse.urlsplit(url)
    proxies = ("https_proxy", "http_proxy", "all_proxy")
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in proxies) or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as e:
            result.append(e.strerror or one_line(e))

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if not result:
        return f"no answer from {parts.hostname}:{port} within {PROBE_TIMEOUT_S} s"
    return None if result[0] is None else f"{parts.hostname}:{port}: {result[0]}"


# --------------------------------------------------------------------------------------------
# Integrity.


def _git_blob_sha1(path: Path) -> str:
    """git's object id of a file: sha1 of 'blob <size>\\0' + content (a non-LFS file's ETag)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def blob_mismatch(pointer: Path) -> str | None:
    """None when the cached blob behind ``pointer`` holds what its ETag (its name) says; else
    what differs. A blob not named by a hash (no symlinks on this disk) is not checked."""
    blob = Path(os.path.realpath(pointer))
    etag = blob.name
    if _HEX64.fullmatch(etag):
        got, kind = file_sha256(blob), "sha256"
    elif _HEX40.fullmatch(etag):
        got, kind = _git_blob_sha1(blob), "git sha1"
    else:
        return None
    return None if got == etag else f"its {kind} is {got}, the ETag that names it {etag}"


# --------------------------------------------------------------------------------------------
# The Hub.


class _Hub:
    """One Hub source's files through ``hf_hub_download``, with eca_flax's error lines."""

    def __init__(self, source: Source, cache: Cache, *, offline: bool, force: bool) -> None:
        self.source, self.cache, self.offline, self.force = source, cache, offline, force
        self.endpoint = _endpoint()
        self.commit: str | None = None

    def fetch(self, filename: str, *, missing_ok: bool = False) -> Path | None:
        """The cached path of ``filename`` (downloaded if needed), its blob checked against its
        ETag; None for a file the repo does not have when ``missing_ok``."""
        import huggingface_hub as hf
        from huggingface_hub import errors as hfe

        blobs = self.cache.repo_folder(self.source.repo) / "blobs"
        before = set(os.listdir(blobs)) if blobs.is_dir() else set()
        try:
            path = Path(
                hf.hf_hub_download(
                    self.source.repo,
                    filename,
                    revision=self.source.revision,
                    cache_dir=self.cache.hub,
                    endpoint=self.endpoint,
                    local_files_only=self.offline,
                    force_download=self.force,
                    library_name="eca_flax",
                    library_version=__version__,
                )
            )
        except hfe.RemoteEntryNotFoundError:
            if missing_ok:
                return None
            raise self.error(f"the repo has no file {filename}") from None
        except hfe.LocalEntryNotFoundError:
            if missing_ok and self._known_missing(filename):
                return None
            raise self.offline_error(f"{filename} is not in the cache") from None
        except Exception as e:  # noqa: BLE001 - huggingface_hub's and httpx's errors, OSError
            if disk_full(e):  # nothing to resume on a full disk: its partial file goes
                for partial in blobs.glob("*.incomplete"):
                    partial.unlink(missing_ok=True)
            raise self.translate(e, filename) from None
        self.commit = path.parent.name if _HEX40.fullmatch(path.parent.name) else self.commit
        if problem := blob_mismatch(path):
            fresh = Path(os.path.realpath(path)).name not in before
            if fresh:  # what the server sent: nothing of it stays in the cache
                Path(os.path.realpath(path)).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                raise self.error(f"{filename} arrived damaged ({problem}); nothing kept")
            raise self.error(
                f"the cached {filename} is damaged ({problem}): {path}; fetch it again with "
                "force_download=True (--force-download)"
            )
        return path

    def _known_missing(self, filename: str) -> bool:
        """Whether the cache records (``.no_exist``) that the cached commit lacks ``filename``."""
        commit = self.cache.commit(self.source.repo, self.source.revision)
        folder = self.cache.repo_folder(self.source.repo) / ".no_exist"
        return commit is not None and (folder / commit / filename).exists()

    def error(self, problem: str) -> DownloadError:
        return DownloadError(f"{self.source.describe()}: {problem}", source=self.source.name)

    def offline_error(self, problem: str, why: str | None = None) -> DownloadError:
        why = why or ("HF_HUB_OFFLINE is set" if _offline() else "offline")
        how = _how_to_get(self.source, self.cache)
        return DownloadError(
            f"{self.source.describe()}: {problem} and {why}; {how}",
            source=self.source.name,
            offline=True,
        )

    def translate(self, e: Exception, filename: str) -> DownloadError:
        """huggingface_hub's error for ``filename`` as one line."""
        from huggingface_hub import errors as hfe

        rev = self.source.revision or "main"
        if isinstance(e, hfe.GatedRepoError):
            return self.error(
                "the repo is gated or private: it needs a token of an account with access "
                "(hf auth login, or HF_TOKEN)"
            )
        if isinstance(e, hfe.RepositoryNotFoundError):
            return self.error(
                f"no such repo on {self.endpoint} (or a private one: it would need a token, "
                "hf auth login or HF_TOKEN)"
            )
        if isinstance(e, hfe.RevisionNotFoundError):
            return self.error(f"no revision {rev!r} in the repo")
        if disk_full(e):
            return self.error(f"could not write {filename} to {self.cache.hub}: disk full")
        if isinstance(e, hfe.HfHubHTTPError):
            return self.error(f"{filename}: {one_line(e)}")
        return self.error(f"{filename}: download failed ({one_line(e)}); run again to resume")


def _how_to_get(source: Source, cache: Cache) -> str:
    where = [cache.own]
    if source.kind == "hub":
        where.insert(0, cache.repo_folder(source.repo))
    return (
        f"where there is network run `python -m eca_flax.weights download {source.name}`, then "
        f"copy {' and '.join(map(str, where))} to the same place here"
    )


def _fetch_hub(source: Source, cache: Cache, *, force: bool) -> tuple[Path, str | None, bool]:
    """(the snapshot folder holding the repo's weights, its commit, whether the weights are an
    eca_flax model file that needs no conversion)."""
    offline = _offline()
    repo = _Hub(source, cache, offline=offline, force=force)
    if not offline and (why := _unreachable(repo.endpoint)):
        repo.offline = True  # whatever is cached may still do
        try:
            return _fetch_hub_files(repo)
        except DownloadError as e:
            if not e.offline:
                raise
            raise repo.offline_error(
                "not in the cache", f"the Hub is unreachable ({why})"
            ) from None
    return _fetch_hub_files(repo)


def _fetch_hub_files(repo: _Hub) -> tuple[Path, str | None, bool]:
    if repo.offline and repo.cache.commit(repo.source.repo, repo.source.revision) is None:
        raise repo.offline_error("not in the cache")  # nothing to look for: no import, no wait
    config = repo.fetch(hub.CONFIG, missing_ok=True)
    if config is None:  # no timm config: an eca_flax model file?
        weights = repo.fetch(hub.HUB_WEIGHTS[0], missing_ok=True)
        if weights is None or not _is_eca_flax_file(weights):
            raise repo.error(
                f"neither timm's layout ({hub.CONFIG} + weights) nor an eca_flax model file "
                f"({hub.HUB_WEIGHTS[0]} with {FORMAT} metadata)"
            )
        return weights.parent, repo.commit, True
    for name in hub.HUB_WEIGHTS:
        path = repo.fetch(name, missing_ok=True)
        if path is None:
            continue
        if name == hub.SHARD_INDEX:
            try:
                shards = hub.shard_files(path)
            except ConversionError as e:
                raise repo.error(str(e)) from None
            for shard in shards:
                repo.fetch(shard)
        return path.parent, repo.commit, False
    raise repo.error(f"{hub.CONFIG} but none of {', '.join(hub.HUB_WEIGHTS)}")


def _is_eca_flax_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return False


# --------------------------------------------------------------------------------------------
# Google Drive.


def _drive_error(source: Source, problem: str, *, offline: bool = False) -> DownloadError:
    return DownloadError(f"{source.describe()}: {problem}", source=source.name, offline=offline)


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _checked_drive_file(source: Source, path: Path) -> Path:
    """``path`` when its sha256 is the one recorded when it was downloaded; else one line."""
    try:
        recorded = _record(path).read_text().split()[0]
    except (OSError, IndexError):
        recorded = None
    got = file_sha256(path)
    if got != recorded:
        raise _drive_error(
            source,
            f"the cached {path} is damaged (sha256 {got}, recorded {recorded}); fetch it again "
            "with force_download=True (--force-download)",
        )
    return path


def _lock(path: Path) -> Any:
    """A lock file beside ``path``: one process downloads or converts it at a time."""
    from filelock import FileLock  # huggingface_hub's dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")))


def _fetch_drive(source: Source, cache: Cache, *, force: bool) -> Path:
    """The authors' released file, from the cache (its sha256 checked) or Google Drive: kept only
    once it is a checkpoint of the expected network."""
    final = cache.drive_file(source)
    if final.is_file() and not force:
        return _checked_drive_file(source, final)
    if _offline():
        raise _drive_error(
            source,
            f"not in the cache ({final}) and HF_HUB_OFFLINE is set; {_how_to_get(source, cache)}",
            offline=True,
        )
    if importlib.util.find_spec("torch") is None:  # before downloading what cannot be checked
        raise _drive_error(
            source,
            "the authors' file is a PyTorch checkpoint: checking and converting it needs torch "
            "(pip install torch; CPU wheels suffice)",
        )
    drive_id = source.drive_file()[1]
    template = os.environ.get(DRIVE_URL_ENV)
    url = template.format(id=drive_id) if template else None
    if why := _unreachable(url or "https://drive.google.com"):
        raise _drive_error(
            source,
            f"not in the cache ({final}) and Google Drive is unreachable ({why}); "
            f"{_how_to_get(source, cache)}",
            offline=True,
        )
    with _lock(final):
        if final.is_file() and not force:  # another process fetched it meanwhile
            return _checked_drive_file(source, final)
        incoming = final.parent / "incoming" / final.name
        incoming.parent.mkdir(parents=True, exist_ok=True)
        _gdown(source, url, drive_id, incoming)
        try:
            digest = _check_drive_download(source, incoming)
            write_file(_record(final), lambda tmp: Path(tmp).write_text(digest + "\n"), OSError)
            os.replace(incoming, final)
        except BaseException:
            incoming.unlink(missing_ok=True)
            raise
    return final


def _gdown(source: Source, url: str | None, drive_id: str, output: Path) -> None:
    """gdown into ``output`` (resuming a partial download: gdown's ``.part`` beside it)."""
    import gdown

    try:
        got = gdown.download(
            url=url,
            id=None if url else drive_id,
            output=str(output),
            quiet=False,
            resume=True,
            use_cookies=False,
            timeout=(10, 120),
        )
    except Exception as e:  # noqa: BLE001 - gdown's and requests' errors, OSError
        if disk_full(e):  # nothing to resume on a full disk: gdown's partial file goes
            for partial in output.parent.glob(f"{output.name}*.part"):
                partial.unlink(missing_ok=True)
            problem = f"could not write {output}: disk full"
        elif "too many" in str(e).lower() or "many accesses" in str(e).lower():
            problem = (
                "Google Drive refuses it for now (too many users have downloaded it recently); "
                "try again later, or fetch it in a browser and give the file to "
                "convert_torch_weights.py"
            )
        else:
            problem = f"download failed ({one_line(e)}); run again to resume"
        raise _drive_error(source, problem) from None
    if got is None or not output.is_file():
        raise _drive_error(source, "download failed (gdown returned no file)")


def _check_drive_download(source: Source, path: Path) -> str:
    """The sha256 of a downloaded file that is a checkpoint of ``source.arch`` with its released
    kernel sizes (a detector: of its kind too); an HTML page or another network is one line."""
    from eca_flax.weights import convert, pth  # here: torch and the converter on a download only

    with open(path, "rb") as f:
        head = f.read(4096).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:512]:
        quota = b"too many users" in head or b"quota" in head
        raise _drive_error(
            source,
            "Google Drive sent an HTML page instead of the file"
            + (" (too many users have downloaded it recently: try again later)" if quota else "")
            + "; nothing kept",
        )
    release = detector_release(source.detector) if source.detector else None
    try:
        checkpoint = pth.read_checkpoint(path)
        if release:
            if checkpoint.detection is None:
                raise ConversionError("not an mmdetection checkpoint")
            spec = convert.backbone_arch(checkpoint)
            kind = pth.detector_kind(path, checkpoint.whole, checkpoint.detection.meta)
        else:
            spec, kind = convert.infer_arch(checkpoint.state_dict), ""
    except ConversionError as e:
        problem = f"the downloaded file is not the release ({e}); nothing kept"
        raise _drive_error(source, problem) from None
    want = release.k_size if release else registry.resolve_k_size(source.arch, None)
    want_kind = release.kind if release else ""
    if spec.arch != source.arch or tuple(spec.k_size) != tuple(want) or kind != want_kind:
        what = f"a {kind} on {spec.describe()}" if kind else spec.describe()
        wanted = f"a {release.kind} on {source.arch}" if release else source.arch
        raise _drive_error(
            source,
            f"the downloaded file holds {what}, not {wanted} with the released kernel sizes "
            f"{','.join(map(str, want))}; nothing kept",
        )
    return file_sha256(path)


# --------------------------------------------------------------------------------------------
# The one entry: a name -> a local eca_flax model.


def fetch(
    name: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
) -> Path:
    """The original files of ``name`` in the cache (downloaded if needed, checked): the Hub
    snapshot folder, or the authors' .pth.tar file; a local path is returned as it is. What
    ``convert_torch_weights.py NAME DST`` converts."""
    source = parse_source(name)
    cache = Cache.at(cache_dir)
    if source.kind == "local":
        return source.path
    if source.kind == "drive":
        return _fetch_drive(source, cache, force=force_download)
    return _fetch_hub(source, cache, force=force_download)[0]


def resolve(
    name: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    log: Callable[[str], None] = _logger.info,
    detector: Callable[..., Any] | None = None,
) -> Path:
    """A local eca_flax model (pretrained directory or .safetensors file) for ``name``: the path
    itself, or the converted model in the cache, downloaded and converted on first use. A cached
    one is returned with no request and no conversion (``force_download``: fetch and convert
    again). A COCO detector's name needs ``detector``, the converter of whole detectors
    (``eca_flax.detection.io.convert_detector``): its cached conversion is a directory."""
    source = parse_source(name)
    if source.kind == "local":
        return source.path
    cache = Cache.at(cache_dir)
    if not force_download and (cached := _cached(source, cache)):
        return cached
    if source.kind == "drive":
        original = _fetch_drive(source, cache, force=force_download)
        converted = cache.converted(source)
    else:
        original, commit, ready = _fetch_hub(source, cache, force=force_download)
        if ready:
            return original / hub.HUB_WEIGHTS[0]
        converted = cache.converted(source, commit or original.name)
    done = converted / "model.json" if source.detector else converted  # written last
    with _lock(converted):
        if force_download or not done.is_file():
            _convert(source, original, converted, log, detector)
    return converted


def _cached(source: Source, cache: Cache) -> Path | None:
    """The converted (or eca_flax) model of ``source`` when the cache has it; no request."""
    if source.kind == "drive":
        path = cache.converted(source)
        done = path / "model.json" if source.detector else path
        return path if done.is_file() else None
    commit = cache.commit(source.repo, source.revision)
    if commit is None:
        return None
    if (path := cache.converted(source, commit)).is_file():
        return path
    snapshot = cache.repo_folder(source.repo) / "snapshots" / commit
    ready = snapshot / hub.HUB_WEIGHTS[0]
    if not (snapshot / hub.CONFIG).exists() and ready.is_file() and _is_eca_flax_file(ready):
        return ready
    return None


def _convert(
    source: Source,
    original: Path,
    converted: Path,
    log: Callable[[str], None],
    detector: Callable[..., Any] | None,
) -> None:
    """Convert the downloaded files to the cache's eca_flax file (written atomically); a
    detector whole, through ``detector``."""
    from eca_flax.weights.convert import convert_file

    if source.detector and detector is None:
        raise TypeError(f"{source.name}: a detector converts through resolve(..., detector=)")
    log(f"converting {source.describe()} to {converted}")
    try:
        convert_file(original, converted, overwrite=True, detector=detector, log=log)
    except ConversionError as e:
        raise DownloadError(
            f"{source.describe()}: the downloaded weights do not convert ({e})", source=source.name
        ) from None
    except PretrainedError as e:
        if disk_full(e) or "no space left" in str(e):
            raise DownloadError(
                f"{source.describe()}: could not write {converted}: disk full; nothing written",
                source=source.name,
            ) from None
        raise


def load_pretrained(
    source: str | os.PathLike[str],
    *,
    dtype: Any = jnp.float32,
    num_classes: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
) -> nnx.Module:
    """The pretrained model ``source`` names (a timm tag, ``hf-hub:ORG/NAME[@REV]``, an original
    model name or a local directory / .safetensors file), in eval mode; downloaded, checked,
    converted and cached on first use. ``dtype``, ``num_classes``, ``seed``: as
    ``pretrained.load_pretrained``."""
    from eca_flax.weights import pretrained

    if detector := parse_source(source).detector:
        raise PretrainedError(
            f"{source}: a COCO detector, not a classifier; load it with "
            f"eca_flax.detection.load_detector({detector!r})"
        )
    path = resolve(source, cache_dir=cache_dir, force_download=force_download)
    try:
        return pretrained.load_pretrained(path, dtype=dtype, num_classes=num_classes, seed=seed)
    except DownloadError:
        raise
    except PretrainedError as e:
        if parse_source(source).kind == "local":
            raise
        raise DownloadError(
            f"{e}; the cached model is damaged: fetch and convert it again with "
            "force_download=True (--force-download)",
            source=str(source),
        ) from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    **kwargs: Any,
) -> nnx.Module:
    """``registry.create_model(name, **kwargs)``, or with ``pretrained=True`` the released
    weights of ``name`` (``load_pretrained``: kernel sizes and attention as released; ``dtype``,
    ``num_classes`` for a new head, ``seed``). A timm tag names its model (``ecaresnet50t.a1_in1k``
    builds ecaresnet50t)."""
    if pretrained:
        allowed = {"dtype", "num_classes", "seed"}
        if extra := sorted(set(kwargs) - allowed):
            raise PretrainedError(
                f"create_model({name!r}, pretrained=True) takes {', '.join(sorted(allowed))}, "
                f"not {', '.join(extra)}: the weights fix the rest"
            )
        return load_pretrained(name, cache_dir=cache_dir, force_download=force_download, **kwargs)
    return registry.create_model(registry.split_tag(name)[0], **kwargs)


# --------------------------------------------------------------------------------------------
# What is released, and what the cache holds.


@dataclasses.dataclass(frozen=True)
class Release:
    """One downloadable model for ``python -m eca_flax.weights list``."""

    name: str
    where: str  # "timm/ecaresnet26t.ra2_in1k" or "Google Drive: eca_resnet50_k3557.pth.tar"
    params: int
    published: str  # "83.29 top-1 @288", "box AP 39.0, mask AP 35.6"
    cached: bool


def releases(cache_dir: str | os.PathLike[str] | None = None) -> Iterator[Release]:
    """Every released model (the originals, each timm tag, the COCO detectors) and whether the
    cache holds it."""
    from eca_flax.detection.settings import RELEASES

    def top1(value: float | None, size: int) -> str:
        return "-" if value is None else f"{value:.2f} top-1 @{size}"

    cache = Cache.at(cache_dir)
    for name in list_models():
        info = model_info(name)
        if info.drive_id:
            source = Source(name, "drive", arch=name)
            where = f"Google Drive: {info.checkpoint}"
            cached = bool(_cached(source, cache))
            yield Release(name, where, info.params, top1(info.top1, 224), cached)
        for tag in info.tags:
            source = Source(f"{name}.{tag.tag}", "hub", repo=info.hub_repo(tag.tag), arch=name)
            cached = bool(_cached(source, cache))
            yield Release(
                source.name, source.repo, info.params, top1(tag.top1, tag.test_size), cached
            )
    for name, r in RELEASES.items():
        source = Source(name, "drive", arch=r.arch, detector=name)
        ap = f"box AP {r.box_ap}" + (f", mask AP {r.mask_ap}" if r.mask_ap else "")
        cached = bool(_cached(source, cache))
        yield Release(name, f"Google Drive: {r.checkpoint}", r.params, ap, cached)


__all__ = [
    "Cache",
    "Release",
    "Source",
    "create_model",
    "fetch",
    "load_pretrained",
    "parse_source",
    "releases",
    "resolve",
]
