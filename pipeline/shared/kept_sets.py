"""The sets of files a state was judged by, kept beside it: a restart under changed files is a
reload, not a loss.

`cityops run`'s state is a snapshot and a journal (pipeline/shared/store.py), judged by one set of
rule packs, params, routing and registry. Restored under other files, that state cannot simply
be loaded into the new set's engine: an incident of a rule the new files removed, or of a
sensor they retired, has nowhere to go, and the tiers it told would never hear it ended. So the
runtime keeps a copy of each set its state refers to (the snapshot's, and each reload journaled
after it), and a restore builds the engine of the snapshot's set from that copy, replays the
journal as it was judged, and then reloads to the files as they are now, exactly as a live
reload does (pipeline/core/reload.py, ``carry``): what cannot go on is resolved with its reason.

    {state}.sets/{digest}/manifest.json      where each file of the copy goes
    {state}.sets/{digest}/files/NN-{name}    the files, in the order the set reads them

`cityops worker` keeps them in `{worker.data_dir}/sets`: a partition's checkpoint names the set
it was made under, and a worker restoring it under other files carries it as a switch would
(pipeline/runtimes/worker.py, ``_restore``) when the copy is there — a worker restarted on the same
machine or volume; one started elsewhere judges the checkpoint by its own files and says so.

A copy is made once per digest (a start or a reload with files not kept yet) and pruned when a
snapshot no longer needs it. It costs one copy of the set's files on disk, the registry's
sensors file included.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.registry import check_districts
from pipeline.core.registry import load as load_registry
from pipeline.core.reload import CitySet, files_digest, set_files
from rules.compiler import load_rules

log = logging.getLogger("cityops.reload")


class KeptSets:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def beside(cls, state_path: Path) -> KeptSets:
        return cls(state_path.with_name(state_path.name + ".sets"))

    def has(self, digest: str) -> bool:
        return (self.root / digest / "manifest.json").is_file()

    def keep(self, s: Any, digest: str) -> bool:
        """Copy the files of settings ``s``'s set, whose digest is ``digest``; False (and a
        warning) when they no longer have that digest (changed since they were read)."""
        if self.has(digest):
            return True
        roles = set_files(s)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=self.root))
        try:
            manifest: dict[str, Any] = {"digest": digest, "originals": []}
            n = 0
            for role, paths in roles.items():
                names = []
                for p in paths:
                    # the registry's files keep their names: registry.yaml names its sensors file
                    name = p.name if role == "registry" else f"{n:03d}-{p.name}"
                    dest = tmp / "files" / (f"registry/{name}" if role == "registry" else name)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if p.exists():
                        shutil.copyfile(p, dest)
                    names.append(str(dest.relative_to(tmp)))
                    manifest["originals"].append([str(p), names[-1] if p.exists() else None])
                    n += 1
                manifest[role] = names
            # the copy is of the files the digest was taken over, or it is no copy of the set
            copies = {Path(o): tmp / rel if rel else None for o, rel in manifest["originals"]}
            if files_digest([Path(o) for o, _ in manifest["originals"]], copies) != digest:
                log.warning("the set's files changed while being kept (digest %s); not kept: a "
                            "restart under other files could not carry this state", digest)
                return False
            (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
            try:
                tmp.rename(self.root / digest)
            except OSError:                   # another process (a worker beside) kept it first
                return self.has(digest)
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, digest: str) -> CitySet:
        """The kept set ``digest``, read and checked as at a start (ConfigError if it no longer
        loads, e.g. under a newer cityops whose rule schema changed)."""
        folder = self.root / digest
        m = json.loads((folder / "manifest.json").read_text())
        rules = load_rules([folder / p for p in m["builtin"] + m["packs"]],
                           folder / m["routing"][0], builtin=False,
                           params=folder / m["params"][0] if m["params"] else None)
        reg_path = folder / m["registry"][0]
        registry = load_registry(reg_path, rules.kinds)
        check_districts(rules.packs, rules.sources, registry,
                        folder / m["params"][0] if m["params"] else None)
        return CitySet(rules, registry, digest)

    def prune(self, keep: set[str], newest: int = 0) -> None:
        """Forget every kept set but ``keep`` (those the state refers to) and the ``newest``
        others (a worker cannot know every partition's checkpoint: it keeps the last few)."""
        if not self.root.is_dir():
            return
        others = sorted((d for d in self.root.iterdir() if d.name not in keep and
                         not d.name.startswith(".")), key=lambda d: d.stat().st_mtime)
        for d in others[:max(0, len(others) - newest)]:
            shutil.rmtree(d, ignore_errors=True)
