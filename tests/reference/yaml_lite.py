"""Reads the flat `key: value  # comment` YAML of configs/models/ without a YAML package."""


def load(path):
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, value = (s.strip() for s in line.split(":", 1))
            if value in ("true", "false"):
                out[key] = value == "true"
            else:
                try:
                    out[key] = int(value)
                except ValueError:
                    out[key] = float(value)
    return out
