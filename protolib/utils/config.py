"""Instantiating config nodes whose constructors take only some of the arguments we know."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate


def instantiate_accepting(spec: Mapping[str, Any], **optional: Any) -> Any:
    """Instantiate ``spec``, adding those ``optional`` arguments its constructor accepts and it does not set
    (a key set to null counts as not set: ``num_classes: null`` in a config means "from the data").

    The target's own ValueError/FileNotFoundError (which names the fix) is raised instead of Hydra's wrapper.
    """
    target = get_class(spec["_target_"])
    parameters = inspect.signature(target.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = {k: v for k, v in optional.items() if (takes_any or k in parameters) and spec.get(k) is None}
    try:
        return instantiate(spec, **extra)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError | FileNotFoundError):
            raise error.__cause__ from error
        raise
