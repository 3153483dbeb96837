"""Files the module ships: training configurations and the worker script.

Installed extension: ``<module>/Resources/Configs/*.toml`` (CMake copies the repository's
``configs/*.toml`` there at build time and installs them). Source tree: the repository's
``configs/`` beside the module folder. The first folder that holds ``.toml`` files wins.
"""

from __future__ import annotations

from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent  # the folder holding RheumAI.py


def configs_dir(module_dir: str | Path = MODULE_DIR) -> Path:
    """The folder of the shipped training configurations (see the module docstring)."""
    module_dir = Path(module_dir)
    for folder in (module_dir / "Resources" / "Configs", module_dir.parent / "configs"):
        if folder.is_dir() and any(folder.glob("*.toml")):
            return folder
    raise FileNotFoundError(f"no training configurations in {module_dir / 'Resources' / 'Configs'} "
                            f"or {module_dir.parent / 'configs'}")


def list_configs(module_dir: str | Path = MODULE_DIR) -> dict[str, Path]:
    """{name (file stem): path} of the shipped training configurations, sorted by name."""
    return {p.stem: p for p in sorted(configs_dir(module_dir).glob("*.toml"))}


def config_task(path: str | Path) -> str:
    """The task a training configuration names (its top-level ``task``; none: "cervical_ra")."""
    import tomllib

    with open(path, "rb") as f:
        return str(tomllib.load(f).get("task", "cervical_ra"))


def default_config(module_dir: str | Path = MODULE_DIR, task: str = "cervical_ra", preferred: str = "small_cpu") -> Path:
    """The configuration the Training panel offers for ``task``: ``preferred`` if it trains that
    task, else ``<task>.toml``, else the first shipped one naming the task, else the first."""
    configs = list_configs(module_dir)
    for name in (preferred, task):
        if name in configs and config_task(configs[name]) == task:
            return configs[name]
    return next((p for p in configs.values() if config_task(p) == task), next(iter(configs.values())))
