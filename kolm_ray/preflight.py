"""Preflight: everything a compile's set-up can fail on, checked before the teacher stage pays
for a single call.

``check_setup`` runs the checks that need no cluster, in order, and returns a ``Setup``:

1. the base model is fully resolvable: its config, tokenizer and weights are in a local folder,
   the Hugging Face cache, or on the hub (``check_base``);
2. the LoRA target modules are Linear layers of its architecture, or, when none were given, are
   chosen from it (``train.targets``: the model is built on the meta device, without weights);
3. its chat template builds the prompt every stage shares (``train.data.prompt_text``);
4. the signing key is a private key model signing can use (``check_signer``);
5. the artifact store, the teacher's response cache and the work dir take a write (``check_writable``).

``join_cluster`` then joins the Ray cluster (an address nothing listens on, or one that refuses
this driver's token, fails in seconds rather than after Ray's own retries), and
``check_cluster`` refuses a compile whose fit and eval workers could never be placed on it, even
empty; what is only busy now waits in the compile queue (``admission.py``) instead.

Each check raises a typed error whose message is one line naming what failed and the fix:
``InputError`` (exit 2) for what the user gave, ``ServiceUnreachable`` (exit 1) for a service
that cannot be reached. Must not call the teacher, load model weights or hold cluster
resources. A base on the hub that is not cached gets its config and tokenizer files (a few MB)
downloaded into the Hugging Face cache, where the fit finds them; its weights are only listed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from kolm_ray.admission import Demand, QueuePolicy, grant_for, load_policy
from kolm_ray.errors import InputError, KolmRuntimeError, ServiceUnreachable
from kolm_ray.signing import KeySigner, Signer, SigstoreSigner
from kolm_ray.store import is_remote, open_store
from kolm_ray.train.base import (BaseRef, cached_commit, hub_cache, hub_gated, hub_no_revision, hub_offline,
                                 hub_unreachable, pin_base, who)
from kolm_ray.train.config import FitConfig

# Files a tokenizer loads from; one is enough (tokenizer.json for fast tokenizers, the others
# for slow ones).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# What is fetched from the hub for a base that is not cached: everything but the weights.
HUB_SMALL_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                   "chat_template.json", "chat_template.jinja"]
HUB_TIMEOUT_S = 10.0  # per request to the hub: a reachable hub answers in well under a second
TCP_TIMEOUT_S = 3.0


# ----- the base model ------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseFiles:
    """Where a base's config and tokenizer can be read now, and where its weights will come from."""

    ref: BaseRef
    folder: Path  # holds at least its config and tokenizer files
    source: str  # "local folder", "HF cache" or "hub"


def missing_model_files(names: Iterable[str]) -> list[str]:
    """What a checkpoint folder (its top-level file names) lacks for ``from_pretrained``: the
    config, a tokenizer, weights. Empty when nothing is missing."""
    top = {n for n in names if "/" not in n}
    missing = []
    if "config.json" not in top:
        missing.append("config.json")
    if not top.intersection(TOKENIZER_FILES):
        missing.append("tokenizer (" + " / ".join(TOKENIZER_FILES[:3]) + ")")
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in top):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    return missing


def missing_shards(folder: Path) -> list[str]:
    """Weight shards a sharded checkpoint's index names that the folder does not have."""
    import json

    out: list[str] = []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = folder / index
        if not p.is_file():
            continue
        try:
            shards = set(json.loads(p.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return [f"a readable {index}"]
        out += sorted(s for s in shards if not (folder / s).is_file())
    return out


def _folder_missing(folder: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if p.is_file()]  # is_file follows the cache's symlinks
    return missing_model_files(names) + missing_shards(folder)


def _hub_cache() -> str:
    return hub_cache()


def _hub_offline() -> bool:
    return hub_offline()


def _who(ref: BaseRef) -> str:
    return who(ref)


def _unreachable(ref: BaseRef, why: str) -> ServiceUnreachable:
    return hub_unreachable(ref, why)


def _cached_snapshot(ref: BaseRef) -> Path | None:
    """The cached snapshot of a hub base, when it has config, tokenizer and every weight file."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.path, revision=ref.revision, local_files_only=True,
                                        cache_dir=_hub_cache()))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or an unreadable cache: ask the hub
        return None
    return folder if folder.is_dir() and not _folder_missing(folder) else None


def _from_hub(ref: BaseRef, timeout_s: float) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if _hub_offline():
        raise _unreachable(ref, "HF_HUB_OFFLINE is set")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(ref.path, revision=ref.revision, timeout=timeout_s)
    except RevisionNotFoundError:  # a commit given by hand that the repository does not have
        raise hub_no_revision(ref, ref.revision or "main") from None
    except GatedRepoError:
        raise hub_gated(ref) from None
    except RepositoryNotFoundError:
        raise InputError(f"unknown base model {ref.name!r}: the Hugging Face hub has no model {ref.path} (a private "
                         "one needs HF_TOKEN), and there is no such local folder") from None
    except Exception as e:  # noqa: BLE001 - offline, DNS, refused, timed out: httpx and the hub raise many types
        raise _unreachable(ref, _why(e)) from None
    missing = missing_model_files(s.rfilename for s in info.siblings or [])
    if missing:
        raise InputError(f"base model {_who(ref)} on the Hugging Face hub has no {', '.join(missing)}: kolm fits "
                         "transformers checkpoints (config.json, a tokenizer, *.safetensors)")
    try:
        folder = snapshot_download(ref.path, revision=ref.revision, allow_patterns=HUB_SMALL_FILES,
                                   cache_dir=_hub_cache(),
                                   endpoint=endpoint, etag_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - as above
        raise _unreachable(ref, _why(e)) from None
    return Path(folder)


def check_base(ref: BaseRef, *, timeout_s: float = HUB_TIMEOUT_S) -> BaseFiles:
    """Where the base's config, tokenizer and weights come from: its folder, the Hugging Face
    cache, or the hub (asked with ``timeout_s``; its small files are downloaded, weights listed).

    Raises:
        InputError: a folder without a config, tokenizer or weights (or a shard its index names),
            a hub id the hub does not know or that has no checkpoint, or a revision (``ID@REV``)
            neither the hub nor, offline, the cache has (``train.base.pin_base``).
        ServiceUnreachable: a base that is not cached while the hub cannot be reached (offline,
            refused, timed out) or is gated.
    """
    if ref.local:
        folder = Path(ref.path)
        missing = _folder_missing(folder)
        if missing:
            raise InputError(f"not a complete model folder: no {', '.join(missing)}; give a folder saved with "
                             "save_pretrained (`kolm base tiny DIR` writes one), a short name or a hub id",
                             path=ref.name)
        return BaseFiles(ref, folder, "local folder")
    ref = pin_base(ref, timeout_s=timeout_s)  # a branch resolved to its commit, once: what every stage loads
    if not ref.pinned:  # the hub answered without a commit: the cache's refs may name the one it holds
        wanted = ref.revision or "main"
        commit = cached_commit(ref.path, wanted)
        if commit is not None:
            ref = replace(ref, revision=commit, requested=wanted)
    # Only a pinned base is taken from the cache; an unpinned one is checked on the hub, then refused.
    cached = _cached_snapshot(ref) if ref.pinned else None
    if cached is not None:
        return BaseFiles(ref, cached, "HF cache")
    folder = _from_hub(ref, timeout_s)
    if not ref.pinned:  # the hub answered without a commit: nothing to record that pins the weights
        raise ServiceUnreachable(f"the Hugging Face hub named no commit for {_who(ref)} at revision "
                                 f"{ref.revision or 'main'}: cannot pin the base; give ID@COMMIT")
    return BaseFiles(ref, folder, "hub")


def check_chat_template(base: BaseFiles) -> str:
    """Build the prompt every stage uses (``prompt_text``: a system message, then the input)
    with the base's tokenizer; returns what it used.

    Raises:
        InputError: the tokenizer does not load, or its chat template fails on that
            conversation or drops the input.
    """
    import transformers
    from transformers import AutoTokenizer

    from kolm_ray.train.data import prompt_text

    name = base.ref.name
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(base.folder))
        except Exception as e:  # noqa: BLE001 - tokenizers fail in many types
            raise InputError(f"cannot load the tokenizer of base {name!r} ({_why(e)}): give a base whose tokenizer "
                             "transformers loads") from None
        probe = "Is this on?"
        try:
            text = prompt_text(tok, "Answer the message.", probe)
            ids = tok(text, add_special_tokens=False).input_ids
        except Exception as e:  # noqa: BLE001 - a Jinja template raises what its author chose
            raise InputError(f"the chat template of base {name!r} fails on kolm's prompt (a system message, then "
                             f"the input) ({_why(e)}): give a base whose template takes a system message") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if probe not in text or not ids:
        raise InputError(f"the chat template of base {name!r} leaves the input out of the prompt: give a base whose "
                         "template renders the user's message")
    return "chat template ok" if getattr(tok, "chat_template", None) else "no chat template (plain prompt)"


# ----- the signer, the store, the work dir ---------------------------------------------------


def check_signer(signer: Signer) -> str:
    """What signs the artifact, checked now: a key signer's file must be a private key of a curve
    model signing takes. Sigstore is checked when it signs (it needs an OIDC identity then).

    Raises:
        InputError: the key file is unreadable, a public key, a certificate, encrypted, not a
            PEM private key, or of another algorithm (the message names the file).
    """
    if isinstance(signer, SigstoreSigner):
        return "signer sigstore (keyless)"
    if not isinstance(signer, KeySigner):
        return signer.describe()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = signer.private_key
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the signing key ({e.strerror or e})", path=where) from None
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError("is a public key: --sign key:PATH signs with the private key (the .pem beside it); the "
                         "public one is what `kolm verify --key` takes", path=where)
    if b"-----BEGIN CERTIFICATE-----" in data:
        raise InputError("is a certificate, not a private key: give --sign key:PATH a PEM private key", path=where)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise InputError("is an encrypted private key: kolm signs with an unencrypted PEM key "
                         "(`openssl pkey -in KEY -out PLAIN.pem`)", path=where) from None
    except Exception:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm: not a key kolm can use either way
        raise InputError("is not a PEM private key: give --sign key:PATH an elliptic-curve private key "
                         "(P-256, P-384, P-521), or leave --sign out to use kolm's own", path=where) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                 "secp521r1"):
        kind = getattr(getattr(key, "curve", None), "name", None) or type(key).__name__.lstrip("_")
        raise InputError(f"is a {kind} key: model signing takes elliptic-curve keys (P-256, P-384, P-521)",
                         path=where)
    return f"signer key {_tilde(path)}"


def check_writable(location: str | os.PathLike, what: str, flag: str) -> None:
    """Write and delete a probe at ``location`` (a folder, created if absent, or an object-store URI).

    Raises:
        InputError: a folder that cannot be created or written (or a bucket that does not exist).
        ServiceUnreachable: an object store that does not take the write (endpoint, credentials).
    """
    probe = f".kolm-preflight-{uuid.uuid4().hex[:12]}"
    if is_remote(location):
        store = open_store(location)
        try:
            store.write_bytes(probe, b"")
            store.delete(probe)
        except InputError:
            raise
        except (KolmRuntimeError, OSError) as e:
            raise ServiceUnreachable(f"{what} {location} does not take a write ({_why(e)}): check its endpoint "
                                     "and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID or the node's role)"
                                     f"{', or give ' + flag + ' a folder' if flag else ''}") from None
        return
    folder = Path(location).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fix = f"give {flag} a folder you can write, or fix its permissions" if flag else "fix its permissions"
        raise InputError(f"{what} {folder} is not writable ({e.strerror or e}): {fix}") from None


# ----- all of the above ----------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What the preflight found: the base, the fit config with its target modules resolved, and
    the parts of the one line it prints."""

    base: BaseFiles
    architecture: str
    fit_cfg: FitConfig
    chat: str
    signer: str

    def line(self, cluster: str | None = None, teacher: str | None = None) -> str:
        """``preflight   base ./tiny-base (Qwen2, local folder) · LoRA on q_proj,... · ...``"""
        parts = [f"base {self.base.ref.name} ({self.architecture}, {self.base.source})",
                 f"LoRA on {','.join(self.fit_cfg.target_modules or ())}", self.chat]
        parts += [teacher] if teacher else []
        parts += [cluster] if cluster else []
        parts += ["store ok", self.signer]
        return "preflight   " + " · ".join(parts)


def check_setup(base: BaseRef, fit_cfg: FitConfig, signer: Signer, *, store: str, work_dir: Path,
                teacher_cache: str, timeout_s: float = HUB_TIMEOUT_S) -> Setup:
    """Every check that needs no cluster, in order (see the module docstring). Returns the
    ``Setup`` with ``fit_cfg``'s target modules resolved from the base's architecture.

    Raises:
        InputError: what the user gave cannot work (exit 2).
        ServiceUnreachable: the hub or an object store cannot be reached (exit 1).
    """
    from kolm_ray.sampling.fanout import samples_target
    from kolm_ray.train.targets import architecture, base_config, lora_targets, skeleton

    files = check_base(base, timeout_s=timeout_s)
    model = skeleton(base_config(str(files.folder)))
    targets = lora_targets(model, fit_cfg.target_modules)
    chat = check_chat_template(files)
    signed = check_signer(signer)
    check_writable(store, "artifact store", "--out")
    check_writable(teacher_cache, "teacher cache", "")
    check_writable(work_dir, "work dir", "--work-dir")
    samples_target(work_dir / "samples")  # a link or a file of the user's there is refused now, not after paying
    return Setup(base=files, architecture=architecture(model), fit_cfg=fit_cfg.model_copy(
        update={"target_modules": targets}), chat=chat, signer=signed)


def check_teacher(model: str) -> str:
    """The teacher answers this environment's key, asked on its free token-counting endpoint.

    Raises:
        InputError: the key is refused or the model unknown (exit 2).
        KolmRuntimeError: the teacher cannot be reached (exit 1).
    """
    from kolm_ray.sampling.teacher import probe

    probe(model)
    return "teacher ok"


# ----- the cluster ---------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=TCP_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _probe_ray(address: str) -> None:
    """Fail fast where ``ray.init`` would retry for minutes: nothing listening at the address,
    or a head that refuses this driver's token.

    Raises:
        ServiceUnreachable: naming the address and the fix.
    """
    import ray

    scheme, _, rest = address.rpartition("://")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not host:
        return  # "auto", "local", or a form Ray parses itself: connect says what is wrong
    host = host.strip("[]")
    hosts = [host]
    if host in ("127.0.0.1", "localhost", "0.0.0.0", "::1"):
        hosts.append(ray.util.get_node_ip_address())  # Ray dials the node's address for loopback
    if not any(_port_open(h, int(port)) for h in hosts):
        raise ServiceUnreachable(
            f"cannot reach the Ray cluster at {address}: nothing answers on port {port} of {host}. Start one with "
            "`ray start --head`, or set --address / RAY_ADDRESS to a running head's address (HOST:6379)")
    if scheme:
        return  # ray://: the Ray Client has its own handshake
    refused: list[BaseException] = []

    def ask() -> None:
        try:
            from ray._raylet import GcsClient  # Ray's own client of the head; no public one checks auth

            GcsClient(address=f"{host}:{port}").internal_kv_get(b"kolm-preflight", None, timeout=5)
        except ray.exceptions.AuthenticationError as e:
            refused.append(e)
        except Exception:  # noqa: BLE001, S110 - anything else: ray.init reports it
            pass

    t = threading.Thread(target=ask, name="kolm-preflight-ray", daemon=True)
    t.start()
    t.join(10)
    if refused:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        fix = ("RAY_AUTH_MODE=token is set, so the token is wrong: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to "
               "the head's (`ray get-auth-token` on the head prints it)" if mode == "token" else
               "the head runs with token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
               "to its token (`ray get-auth-token` on the head prints it)")
        raise ServiceUnreachable(f"the Ray cluster at {address} refused this driver: {fix}")


def join_cluster(address: str | None, log_file: Path | None = None) -> None:
    """Join the Ray cluster at ``address`` (else ``RAY_ADDRESS``, else start a local one), after
    checking the address answers and takes this driver's token.

    Raises:
        ServiceUnreachable: the address does not answer, refuses the token, or Ray cannot join.
    """
    import ray

    from kolm_ray.cluster import connect, quiet_ray_output
    from kolm_ray.home import state_dir

    target = address or os.environ.get("RAY_ADDRESS") or None
    if target and not ray.is_initialized():
        quiet_ray_output(log_file or state_dir() / "logs" / "ray.log")  # the probe's C++ log lines too
        _probe_ray(target)
    try:
        connect(address, log_file=log_file)
    except KolmRuntimeError as e:
        if target is None:
            raise
        raise ServiceUnreachable(f"cannot join the Ray cluster at {target} ({_why(e)}): start one with "
                                 "`ray start --head`, or set --address / RAY_ADDRESS to a running head") from None


def cluster_sizes(workers: int) -> dict[str, tuple[float, float]]:
    """(CPU, GPU) of each alive node, plus, for each node type an autoscaler may add, up to
    ``workers`` more nodes of that size: what the cluster could ever offer one compile."""
    import ray

    sizes = {n["NodeID"]: (float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
             for n in ray.nodes() if n.get("Alive")}
    try:  # the autoscaler's node types (Ray Data reads them the same way); none without one
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray: the alive nodes only
        config = None
    for group in (config.node_group_configs if config else []):
        if group.max_count == 0:
            continue
        room = workers if group.max_count < 0 else min(workers, group.max_count)
        for i in range(room):
            sizes[f"autoscaled:{group.name}:{i}"] = (float(group.resources.get("CPU", 0)),
                                                      float(group.resources.get("GPU", 0)))
    return sizes


def never_fits(demand: Demand, sizes: dict[str, tuple[float, float]], policy: QueuePolicy) -> str | None:
    """Why ``demand``'s workers could not be placed even on the empty cluster of ``sizes``
    (at the policy's smallest CPU share), or None when they could. Pure."""
    if grant_for(demand, sizes, policy) is not None:
        return None
    cpu, gpu = max(sizes.values(), default=(0.0, 0.0))
    least = min(policy.min_cpus_per_worker, demand.cpus_per_worker)
    each = f"{least:g} CPU" + (f" and {demand.gpus_per_worker:g} GPU" if demand.gpus_per_worker else "")
    return (f"{demand.workers} fit/eval worker(s) of at least {each} each fit on no set of its nodes, even idle "
            f"(largest: {cpu:g} CPU, {gpu:g} GPU)")


def check_cluster(fit_cfg: FitConfig, state_dir: Path) -> str:
    """Refuse a compile the joined cluster could never run; returns its size for the line.

    Raises:
        KolmRuntimeError: no set of the cluster's nodes (with those an autoscaler may add) can
            hold the fit's workers at the queue's smallest share.
    """
    import ray

    sizes = cluster_sizes(fit_cfg.workers)
    alive = [s for k, s in sizes.items() if not k.startswith("autoscaled:")]
    gpus = sum(g for _, g in alive)
    use_gpu = fit_cfg.use_gpu if fit_cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    demand = Demand(workers=fit_cfg.workers, cpus_per_worker=fit_cfg.cpus_per_worker or 1.0,
                    gpus_per_worker=1.0 if use_gpu else 0.0)
    why = never_fits(demand, sizes, load_policy(state_dir))
    if why:
        raise KolmRuntimeError(f"the Ray cluster can never run this compile: {why}. Lower --workers or "
                               "--cpus-per-worker, or add nodes")
    shown = f"{sum(c for c, _ in alive):g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
    return shown + (f" on {len(alive)} nodes" if len(alive) > 1 else "")


# ----- wording -------------------------------------------------------------------------------


def _why(e: BaseException) -> str:
    """An exception as a short clause: its type and its first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if text == home or text.startswith(home + os.sep) else text
