"""Prints one of the README's two commands, exactly as written there.

    python3 .ci/readme_command.py main   # the first bash block under "## The two commands"
    python3 .ci/readme_command.py test   # the second one

CI runs what the README says, so the README cannot drift from what is tested.
"""
import re
import sys

HEADING = "## The two commands"


def readme_commands(text: str) -> list[str]:
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


if __name__ == "__main__":
    which = {"main": 0, "test": 1}[sys.argv[1]]
    with open("README.md") as f:
        commands = readme_commands(f.read())
    if len(commands) < 2:
        sys.exit(f"README.md: expected two ```bash blocks under {HEADING!r}, found {len(commands)}")
    print(commands[which])
