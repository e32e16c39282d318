"""Topics files for steering (``pipelines/steer.py --topics``), read through ``codebook.schema``.

    prompts: ["The", "In the"]            # or --prompts
    background_files: [data/text/shakespeare]   # and/or background_texts: [...]
    topics:
      - {name: law, regex: '\\b(court|judge|law)\\b', topic_files: [data/text/enwiki/Law.txt]}

Each topic needs a name, a regex (matched case-insensitively against generations) and some
text (``topic_texts`` and/or ``topic_files``: files or folders of .txt/.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codebook.errors import ConfigError
from codebook.schema import build, read_yaml


@dataclass
class TopicEntry:
    name: str
    regex: str
    topic_texts: list[str] = field(default_factory=list)
    topic_files: list[str] = field(default_factory=list)


@dataclass
class TopicsFile:
    topics: list[TopicEntry]
    prompts: list[str] = field(default_factory=list)
    background_texts: list[str] = field(default_factory=list)
    background_files: list[str] = field(default_factory=list)


def _texts(texts: list[str], files: list[str], where: str, key: str) -> list[str]:
    from codebook.data.text import expand_paths

    texts = list(texts)
    if files:
        texts += [Path(f).read_text(errors="replace")
                  for f in expand_paths(files, (".txt", ".md", ".text"))]
    if not any(t.strip() for t in texts):
        raise ConfigError(f"{where}{key}_texts", "empty",
                          f"give {key}_texts or {key}_files with some text")
    return texts


def load_topics(path: str | Path, prompts: list[str] | None) -> dict[str, Any]:
    """Read and check the topics file before any model is loaded: ``{"prompts", "background",
    "topics": [{"name", "regex" (compiled), "topic_texts"}]}``."""
    data = read_yaml(path, "--topics", "pass a YAML file (see codebook/topics.py)")
    if not isinstance(data, dict) or not data.get("topics"):
        raise ConfigError("--topics", f"{path} has no 'topics' list",
                          "see codebook/topics.py's docstring for the format")
    spec = build(TopicsFile, data, "")
    prompts = prompts if prompts is not None else spec.prompts
    if not prompts:
        raise ConfigError("prompts", "no prompts", "add prompts: [...] or pass --prompts")
    background = _texts(spec.background_texts, spec.background_files, "", "background")
    topics = []
    for i, t in enumerate(spec.topics):
        where = f"topics[{i}]"
        if not t.name or not t.regex:
            raise ConfigError(where, f"got {t!r}", "each topic needs name and regex")
        try:
            pattern = re.compile(t.regex, re.IGNORECASE)
        except re.error as err:
            raise ConfigError(f"{where}.regex", str(err), "fix the pattern") from err
        topics.append({"name": t.name, "regex": pattern,
                       "topic_texts": _texts(t.topic_texts, t.topic_files, f"{where}.", "topic")})
    return {"prompts": prompts, "background": background, "topics": topics}
