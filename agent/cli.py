def main() -> None:
    print("agent")
