"""Label resolution for landing-zone keys: the folder or file name says the class."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_CLASSES = ("glioma", "meningioma")
DEFAULT_POSITIVE_CLASS = "meningioma"

_LEADING_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ClassSpec:
    """The class names in logit order, and the one AUC treats as positive."""

    names: tuple[str, ...] = DEFAULT_CLASSES
    positive: str = DEFAULT_POSITIVE_CLASS

    def __post_init__(self) -> None:
        names = tuple(n.strip().lower() for n in self.names if n.strip())
        if len(names) != 2 or len(set(names)) != 2:
            raise ValueError(
                f"MRI_CLASSES must name exactly two distinct classes, got {self.names!r}"
            )
        positive = self.positive.strip().lower()
        if positive not in names:
            raise ValueError(
                f"MRI_POSITIVE_CLASS {self.positive!r} is not one of MRI_CLASSES {names}"
            )
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "positive", positive)

    @classmethod
    def parse(cls, names: str | None, positive: str | None) -> ClassSpec:
        """Build from the comma-separated MRI_CLASSES and MRI_POSITIVE_CLASS settings."""
        parsed = tuple(names.split(",")) if names else DEFAULT_CLASSES
        return cls(parsed, positive or (DEFAULT_POSITIVE_CLASS if not names else parsed[-1]))

    @property
    def positive_index(self) -> int:
        return self.names.index(self.positive)

    def index(self, label: str) -> int:
        return self.names.index(label)


def leading_class(name: str, classes: ClassSpec) -> str | None:
    """The class named by the leading word of a folder or file name, if any."""
    match = _LEADING_WORD.match(name.strip().lower())
    if match and match.group(0) in classes.names:
        return match.group(0)
    return None


def resolve_label(relative_key: str, classes: ClassSpec) -> str | None:
    """Label of a key relative to its split folder (``Glioma T2/0001.jpg`` -> ``glioma``).

    The nearest folder whose leading word is a class wins; otherwise the file name's leading
    word (``meningioma (12).jpeg``). Returns None when neither names a class.
    """
    parts = [p for p in relative_key.split("/") if p]
    if not parts:
        return None
    for folder in reversed(parts[:-1]):
        label = leading_class(folder, classes)
        if label:
            return label
    return leading_class(parts[-1], classes)
