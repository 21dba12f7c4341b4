"""socrates-launch: the local CLI. Light by rule: never imports torch; imports sky lazily."""
from pathlib import Path

__version__ = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
