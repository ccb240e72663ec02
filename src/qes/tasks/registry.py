"""The tasks the workflow knows, by name: each task's module registers its :class:`~qes.tasks.base.TaskKind`
when it is imported (:mod:`qes.tasks` imports them all), and every lookup of a task name goes through here."""

from __future__ import annotations

from typing import TypeVar

from qes.tasks.base import TaskKind

K = TypeVar("K", bound=type[TaskKind])

_KINDS: dict[str, TaskKind] = {}


class UnknownTaskError(ValueError):
    """A task name no task registered."""


def register(kind: K) -> K:
    """Class decorator: register an instance of a task kind under its ``name``."""
    if kind.name in _KINDS:
        twice = f"{type(_KINDS[kind.name]).__name__} and {kind.__name__}"
        raise ValueError(f"task {kind.name!r} is registered twice ({twice})")
    _KINDS[kind.name] = kind()
    return kind


def known_tasks() -> tuple[str, ...]:
    """The registered task names, sorted."""
    return tuple(sorted(_KINDS))


def task_kind(name: str, where: str = "task.name") -> TaskKind:
    """The task registered as ``name``; an unknown name is an error naming ``where`` it came from."""
    try:
        return _KINDS[name]
    except KeyError:
        raise UnknownTaskError(f"{where}: unknown task {name!r}; known tasks: {', '.join(known_tasks())}") from None
