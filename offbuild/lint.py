"""`offbuild --lint`: Python recipe scripts that import networking modules, found by AST."""
from __future__ import annotations

import ast
import os
import shlex
from dataclasses import dataclass

from .model import Job

NETWORK_MODULES = frozenset({
    "socket", "ssl", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib",
    "xmlrpc", "socketserver", "asyncio.streams", "requests", "httpx", "aiohttp", "urllib3", "websocket",
    "websockets", "paramiko", "boto3", "botocore", "grpc", "pycurl", "fsspec", "smb", "dns",
})


@dataclass(frozen=True, slots=True)
class Finding:
    script: str
    line: int
    module: str
    stage: str

    def __str__(self) -> str:
        return (f"{self.script}:{self.line}: imports '{self.module}' but stage '{self.stage}' runs offline"
                " (add `network: true` if it needs the network)")


def recipe_scripts(job: Job) -> list[str]:
    """Existing `*.py` files named in the recipe."""
    try:
        words = shlex.split(job.recipe, comments=True)
    except ValueError:
        words = job.recipe.split()
    return sorted({word for word in words if word.endswith(".py") and os.path.isfile(word)})


def network_imports(path: str) -> list[tuple[int, str]]:
    """(line, module) for each import of a networking module in a Python file."""
    try:
        with open(path, "rb") as handle:
            tree = ast.parse(handle.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return []
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        for name in names:
            parts = name.split(".")
            if any(".".join(parts[:i]) in NETWORK_MODULES for i in range(1, len(parts) + 1)):
                found.append((node.lineno, name))
                break
    return found


def lint(jobs: list[Job]) -> list[Finding]:
    """Findings for offline jobs whose Python scripts import networking modules."""
    findings, seen = [], set()
    for job in jobs:
        if job.stage.network:
            continue
        for script in recipe_scripts(job):
            for line, module in network_imports(script):
                key = (script, line, job.stage.name)
                if key not in seen:
                    seen.add(key)
                    findings.append(Finding(script, line, module, job.stage.name))
    return findings
