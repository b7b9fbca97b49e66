from tinyfleet.agent import cli as agent_cli


def main() -> None:
    x: int = 1
    print("host", agent_cli)
