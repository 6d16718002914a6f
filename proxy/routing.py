"""Map a client's ``model`` to the upstreams that can serve it.

A client may ask for a model's ``alias``, its upstream ``name``, or
``<provider-name>/<model>``; a provider with a ``prefix`` is reached only as
``<prefix>/<alias or name>``. An alias may be a glob (``claude-*``): exact
names always win, then the globs in file order (the first that matches; all
providers that share that glob serve it). Disabled providers route nothing.

A provider with ``base-urls`` gives one target per address (its replicas),
except the replicas disabled there.
All targets of one name are its replica set, balanced by the set's policy
(``fleet.aliases`` for that name, else the first provider's ``balance``, else
``fleet.balance``): round-robin sets are rotated here, the others are ordered
per request by ``proxy.balance``; the caller walks the list in order for
failover. Built once per loaded config; read-only afterwards except for the
round-robin counters (``itertools.count`` is atomic under the GIL).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Iterator

from .config.model import Model, Provider, Settings
from .errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Target:
    """One way to serve a request: a provider (one of its replicas) and the model id it knows."""

    provider: Provider
    model: str
    spec: Model | None = None  # the model entry (max-output-tokens, context-length)
    url: str = ""              # this replica's base URL ("" = the provider's base-url)
    replica: str = ""          # this replica's name: the provider's, or "<provider>#<n>" for base-urls

    @property
    def base_url(self) -> str:
        return self.url or self.provider.base_url

    @property
    def replica_name(self) -> str:
        return self.replica or self.provider.name


class Replicas(tuple):
    """The targets for one name, in the order to try them, with the replica set's ``policy``."""

    policy = "round-robin"
    name = ""  # the name or glob the client's model matched
    columns = None  # (table, replica names, columns): the balancer's, kept here once looked up


def narrowed(targets: tuple[Target, ...], kept) -> tuple[Target, ...]:
    """Some of ``targets`` (an allow-list, native-only), still a replica set with its policy."""
    out = Replicas(kept)
    out.name, out.policy = getattr(targets, "name", ""), getattr(targets, "policy", "round-robin")
    return out


class Router:
    def __init__(self, settings: Settings) -> None:
        table: dict[str, list[Target]] = {}
        listed: dict[str, list[Target]] = {}  # the names /v1/models shows, in file order
        globs: dict[str, list[Target]] = {}   # glob alias -> targets, in file order

        def add(name: str, target: Target, listing: bool) -> None:
            targets = table.setdefault(name, [])
            if target not in targets:
                targets.append(target)
            if listing:
                listed.setdefault(name, []).append(target)

        for provider in settings.providers:
            if provider.disabled:
                continue
            urls = provider.base_urls
            for model in provider.models:
                if urls:
                    for number, url in enumerate(urls, 1):
                        if number in provider.replicas_off:
                            continue  # a disabled replica keeps its number: the others keep their names
                        self._place(Target(provider, model.name, model, url, f"{provider.name}#{number}"),
                                    add, globs)
                else:
                    self._place(Target(provider, model.name, model), add, globs)
        fleet = settings.fleet
        overrides = dict(fleet.aliases)

        def replicas(name: str, targets: list[Target]) -> Replicas:
            group = Replicas(targets)
            group.name = name
            group.policy = overrides.get(name) or next(
                (t.provider.balance for t in targets if t.provider.balance), fleet.balance)
            return group

        self._table = {name: replicas(name, targets) for name, targets in table.items()}
        self._listed = {name: tuple(targets) for name, targets in listed.items()}
        self._globs = tuple((pattern, replicas(pattern, targets)) for pattern, targets in globs.items())
        self._turns = {name: itertools.count() for name, targets in [*self._table.items(), *self._globs]
                       if len(targets) > 1 and targets.policy == "round-robin"}

    @staticmethod
    def _place(target: Target, add, globs: dict[str, list[Target]]) -> None:
        """Enter one target under every name it answers to."""
        provider, model = target.provider, target.spec
        if model.alias_is_glob:
            pattern = f"{provider.prefix}/{model.alias}" if provider.prefix else model.alias
            targets = globs.setdefault(pattern, [])
            if target not in targets:
                targets.append(target)
            # a pattern is not a model id: list the upstream name instead
            add(f"{provider.prefix}/{model.name}" if provider.prefix else model.name, target, True)
            add(f"{provider.name}/{model.name}", target, False)
            return
        public = model.alias or model.name
        if provider.prefix:
            add(f"{provider.prefix}/{public}", target, True)
            if model.alias:
                add(f"{provider.prefix}/{model.name}", target, False)
        else:
            add(public, target, True)
            if model.alias:
                add(model.name, target, False)
        add(f"{provider.name}/{model.name}", target, False)
        if model.alias:
            add(f"{provider.name}/{model.alias}", target, False)

    def resolve(self, model: str) -> Replicas:
        """Targets for ``model``; a round-robin set rotated so each call starts at the next replica."""
        targets = self.named(model)
        turns = self._turns.get(targets.name)
        if turns is None:
            return targets
        start = next(turns) % len(targets)
        return narrowed(targets, targets[start:] + targets[:start])

    def named(self, model: str) -> Replicas:
        """The targets ``model`` names, in file order, taking no round-robin turn (what only describes a
        model or counts its tokens, ``GET /v1beta/models`` or ``count_tokens``, is no routed request)."""
        targets = self._table.get(model)
        if targets is None:
            targets = self.match_glob(model)[1]
        if targets is None:
            raise model_not_found(model)
        return targets

    def match_glob(self, model: str) -> tuple[str, Replicas | None]:
        """The first glob alias (in file order) that matches ``model``, and its targets."""
        for pattern, targets in self._globs:
            if fnmatchcase(model, pattern):
                return pattern, targets
        return "", None

    def replica_sets(self) -> list[Replicas]:
        """The names clients ask for that reach more than one replica (globs too), in file order."""
        named = [self._table[name] for name in self._listed] + [targets for _, targets in self._globs]
        return [targets for targets in named if len(targets) > 1]

    def targets(self) -> Iterator[Target]:
        """Every configured target (one may come more than once: it answers to several names)."""
        for group in [*self._table.values(), *(targets for _, targets in self._globs)]:
            yield from group

    def knows(self, model: str) -> bool:
        """True when ``model`` routes somewhere (an exact name or a glob alias)."""
        return model in self._table or self.match_glob(model)[1] is not None

    def listing(self, allow: Callable[[tuple[Target, ...]], tuple[Target, ...]] | None = None) -> list[dict]:
        """The OpenAI ``model`` objects for ``GET /v1/models``; ``allow`` keeps the targets a client key may use
        (a name none of whose targets it may use is left out)."""
        out = []
        for name, targets in self._listed.items():
            if allow is not None:
                targets = allow(targets)
                if not targets:
                    continue
            out.append({"id": name, "object": "model", "created": 0, "owned_by": targets[0].provider.name,
                        "providers": list(dict.fromkeys(t.provider.name for t in targets)),
                        "force_upstream_stream": any(t.provider.force_upstream_stream for t in targets)})
        return out


def model_not_found(model: str) -> ModelNotFound:
    """What a name that serves nothing gets; a model outside the key's allow-list gets exactly this too
    (state/limits.py), as /v1/models hides it: the answer never tells that a model exists."""
    return ModelNotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model")
