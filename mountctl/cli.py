def main() -> int:
    raise SystemExit("mountctl: not available yet")
