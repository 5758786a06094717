"""Is the Hugging Face Hub reachable? Asked once per process, in seconds, so that a hub id on a machine without
network fails at once with one line instead of after minutes of the libraries' retries.

When the hub cannot be reached, `HF_HUB_OFFLINE=1` is set for this process: transformers, datasets and
huggingface_hub then read their local caches only, and a model or dataset that is not cached fails immediately.
`load_dataset` is the one place a hub dataset is loaded (text and image stages), `repo_file` the one place a file of
a hub model repo is fetched by name (the libraries' own loaders read the configs they load).
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT_S = 3.0
_probe_failed = False  # set when this process found the hub unreachable (and then switched the libraries offline)


def offline_by_setting() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                                                  "TRANSFORMERS_OFFLINE"))


@lru_cache(maxsize=1)
def reachable() -> bool:
    """False when offline by setting or when a TCP connection to the hub's endpoint fails within TIMEOUT_S; then
    the libraries are switched to their caches for the rest of the process."""
    if offline_by_setting():
        return False
    global _probe_failed
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=TIMEOUT_S):
            return True
    except OSError:
        _probe_failed = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        try:  # huggingface_hub reads the variable at import: tell an already imported one too
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
        except Exception:  # pragma: no cover - an older huggingface_hub
            pass
        return False


def online_for(source) -> bool:
    """Before reading `source` with the libraries: True for a local path; for anything else (a hub id), whether the
    hub answers (asked once per process). When it does not, reachable() has switched the process to the libraries'
    caches, so the read fails at once instead of retrying for half a minute, and False says a failure may be the
    missing network (load_failure's wording). It says nothing of whether the id or revision exists."""
    return Path(source).exists() or reachable()


def repo_file(repo: str, name: str, revision: str | None = None) -> Path | None:
    """One small file (a config) of the hub repo `repo` at `revision`, from the hub or, offline (online_for), the
    local cache; None when neither has it: no such repo, revision or file, `repo` is not a repo id, or offline and not
    cached. Any other failure is raised (a dropped connection or the hub's 5xx while it is reachable, a gated repo),
    for the caller to say."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    online = online_for(repo)
    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except LocalEntryNotFoundError:  # not cached, and the hub did not answer: offline, or a failure while online
        if online:
            raise
        return None
    except GatedRepoError:  # the hub has it, for those granted access
        raise
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        return None


def unreachable_note() -> str:
    if _probe_failed:
        return f"the hub cannot be reached from this machine (no connection within {TIMEOUT_S:g} s)"
    return "the hub cannot be reached (HF_HUB_OFFLINE is set)"


def load_failure(online: bool, failure: str) -> str:
    """Why loading from the hub failed: offline, that the hub cannot be reached and the cache lacks it; online,
    `failure` (what the library said)."""
    return failure if online else f"{unreachable_note()} and it is not in the local cache"


def dataset_parts(spec: str) -> tuple[str, str | None, str]:
    """(id, configuration or None, split) of a hub dataset spec: `org/name`, `org/name:split` or
    `org/name:config:split` (a dataset with several configurations: `openai/gsm8k:main:test`); split train by
    default."""
    name, *rest = spec.split(":", 2)
    config, split = (None, rest[0] if rest else "") if len(rest) < 2 else rest
    return name, config or None, split or "train"


def dataset_spec(name: str, config: str | None = None, split: str | None = None) -> str:
    """The spec dataset_parts reads: `org/name:split`, or `org/name:config:split` with a configuration."""
    return f"{name}:{config}:{split or 'train'}" if config else f"{name}:{split or 'train'}"


def load_dataset(spec: str, **options):
    """A hub dataset (dataset_parts' spec) as a datasets.Dataset; offline, from the local cache only. `options`:
    datasets.load_dataset's (data_dir, revision), None ones left out. A failure is one line (PipelineError)."""
    import datasets

    from pipeline.cli import PipelineError, first_line

    name, config, split = dataset_parts(spec)
    online = reachable()
    try:
        options = {key: value for key, value in {"name": config, **options}.items() if value is not None}
        return datasets.load_dataset(name, split=split, **options)
    except Exception as err:  # the hub's and the library's many failures: one line, not a traceback
        why = load_failure(online, f"loading it from the hub failed: {first_line(err)}")
        raise PipelineError(f"dataset '{spec}': not a local file or folder, and {why}") from None
