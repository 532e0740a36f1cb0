"""One exception root: every exception class kwollect defines derives from KwollectError, and
its timeouts and unreachable targets from the built-in TimeoutError and ConnectionError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import kwollect
from kwollect.errors import KwollectError, TargetTimeout, TargetUnreachable


def kwollect_exceptions() -> list[type[BaseException]]:
    found = []
    for module_info in pkgutil.walk_packages(kwollect.__path__, "kwollect."):
        if module_info.name.endswith("__main__"):
            continue  # running it starts the program
        module = importlib.import_module(module_info.name)
        found += [obj for obj in vars(module).values()
                  if inspect.isclass(obj) and issubclass(obj, BaseException)
                  and obj.__module__ == module.__name__]
    return found


def test_every_exception_class_derives_from_kwollect_error():
    classes = kwollect_exceptions()
    assert len(classes) >= 15  # the walk found the protocol, store and gateway errors
    assert [c.__qualname__ for c in classes if not issubclass(c, KwollectError)] == []


def test_timeouts_and_unreachable_targets_are_also_the_built_in_kinds():
    for cls in kwollect_exceptions():
        if "Timeout" in cls.__name__:
            assert issubclass(cls, TimeoutError), cls
        if "Unreachable" in cls.__name__:
            assert issubclass(cls, ConnectionError), cls
    assert issubclass(TargetTimeout, TimeoutError) and issubclass(TargetUnreachable, OSError)


def test_errors_that_were_value_errors_still_are():
    from kwollect.collect.metricsd import ConfigError
    from kwollect.options import OptionError
    from kwollect.store.spool import SpoolError
    from kwollect.yamlfile import YamlFileError
    assert all(issubclass(c, ValueError) for c in (ConfigError, OptionError, YamlFileError))
    assert issubclass(SpoolError, OSError)
