#!/usr/bin/env bash
# The module rule of docs/architecture.md ("Modules"), checked: the pure targets (vocabulary
# and cores) reach no I/O module.
#
#   scripts/check-purity.sh              check this package
#   scripts/check-purity.sh --self-test  prove the checker rejects a bad graph and a bad import
#
# 1. Dependencies: from `swift package describe --type json`, every target and product a pure
#    target reaches (transitively, through the package's own targets) must be in ALLOWED.
# 2. Sources: no file of a pure target imports a module in FORBIDDEN (Foundation, libc,
#    Dispatch, NIOPosix, TOMLKit, journald, swift-log, ...), nor any other module outside
#    ALLOWED and the standard library. Every `import` line counts, inside `#if` too.
# One line per violation, then a summary line; exit status 1 if anything was found.
# scripts/test.sh runs both modes; the build itself runs with
# --explicit-target-dependency-import-check error, which refuses an import of a module the
# target does not declare.
set -euo pipefail
cd "$(dirname "$0")/.."

exec python3 - "$@" <<'PY'
import json, os, re, subprocess, sys, tempfile

# Pure targets: the vocabulary, the three cores, the node runtime and the simulator.
PURE = ["HACore", "Quorum", "Replication", "NodeRuntime", "Simulation"]
REQUIRED_PURE = ["HACore", "Quorum", "Replication", "NodeRuntime", "Simulation"]
# What a pure target may reach: each other, NIOCore (ByteBuffer) and Crypto (frame MAC,
# metadata checksums).
ALLOWED = set(PURE) | {"NIOCore", "Crypto"}
# Modules that mean I/O (or an I/O-capable runtime) in a source file.
FORBIDDEN = {
    "Foundation", "FoundationEssentials", "FoundationInternationalization", "FoundationNetworking", "FoundationXML",
    "Glibc", "Musl", "Darwin", "Bionic", "Android", "WASILibc", "ucrt", "WinSDK",
    "Dispatch", "NIOPosix", "NIO", "TOMLKit", "CSystemd", "Logging",
}
# Standard-library modules a pure file may import besides ALLOWED.
STDLIB = {"Swift", "_Concurrency", "_StringProcessing", "RegexBuilder", "Synchronization"}

IMPORT = re.compile(
    r"^\s*(?:@[A-Za-z_]\w*(?:\([^)]*\))?\s+)*import\s+"
    r"(?:(?:typealias|struct|class|enum|protocol|let|var|func)\s+)?([A-Za-z_]\w*)")


def check_graph(describe, pure, allowed):
    """Violations of the dependency rule in a `swift package describe --type json` document."""
    targets = {t["name"]: t for t in describe.get("targets", [])}
    out = []
    for name in REQUIRED_PURE:
        if name not in targets:
            out.append(f"purity: pure target {name} is missing from the package (renamed? update scripts/check-purity.sh)")
    for root in [p for p in pure if p in targets]:
        seen, queue = {root: [root]}, [root]
        while queue:
            name = queue.pop(0)
            t = targets[name]
            chain = seen[name]
            for product in t.get("product_dependencies", []):
                if product not in allowed:
                    out.append(f"purity: {root} depends on product {product} ({' -> '.join(chain + [product])}); "
                               f"a pure target may reach only {', '.join(sorted(allowed))}")
            for dep in t.get("target_dependencies", []):
                if dep in seen:
                    continue
                seen[dep] = chain + [dep]
                if dep not in allowed:
                    out.append(f"purity: {root} depends on target {dep} ({' -> '.join(seen[dep])}); "
                               f"a pure target may reach only {', '.join(sorted(allowed))}")
                if dep in targets:
                    queue.append(dep)
    return out


def check_sources(describe, root_dir, pure, allowed):
    """Violations of the import rule in the pure targets' Swift files, and the file count."""
    out, files = [], 0
    for t in describe.get("targets", []):
        if t["name"] not in pure:
            continue
        base = os.path.join(root_dir, t["path"])
        for dirpath, _, names in sorted(os.walk(base)):
            for fname in sorted(names):
                if not fname.endswith(".swift"):
                    continue
                files += 1
                path = os.path.join(dirpath, fname)
                rel = os.path.relpath(path, root_dir)
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = IMPORT.match(line)
                        if not m:
                            continue
                        module = m.group(1)
                        if module in FORBIDDEN:
                            out.append(f"purity: {rel}:{lineno}: pure target {t['name']} imports {module} (I/O)")
                        elif module not in allowed and module not in STDLIB:
                            out.append(f"purity: {rel}:{lineno}: pure target {t['name']} imports {module}, "
                                       f"which is not in the allowlist")
    return out, files


def run(describe, root_dir, pure=PURE, allowed=ALLOWED):
    graph = check_graph(describe, pure, allowed)
    sources, files = check_sources(describe, root_dir, pure, allowed)
    present = sorted(t["name"] for t in describe.get("targets", []) if t["name"] in pure)
    return graph + sources, present, files


def self_test():
    failures = []

    def expect(cond, what):
        print(f"purity self-test: {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        def write(rel, text):
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                f.write(text)

        write("Sources/HACore/Good.swift", "// import Foundation (a comment, not an import)\nimport NIOCore\n@preconcurrency import Crypto\n")
        write("Sources/Quorum/Core.swift", "import HACore\n")
        write("Sources/Replication/Codec.swift", "import HACore\nimport NIOCore\n")
        write("Sources/NodeRuntime/Runtime.swift", "import HACore\nimport Quorum\nimport Replication\n")
        write("Sources/Simulation/World.swift", "import NodeRuntime\nimport NIOCore\n")
        write("Sources/Shell/IO.swift", "import Foundation\nimport NIOPosix\n")  # not pure: may import anything
        good = {"targets": [
            {"name": "HACore", "path": "Sources/HACore", "product_dependencies": ["NIOCore", "Crypto"]},
            {"name": "Quorum", "path": "Sources/Quorum", "target_dependencies": ["HACore"]},
            {"name": "Replication", "path": "Sources/Replication", "target_dependencies": ["HACore"], "product_dependencies": ["NIOCore"]},
            {"name": "NodeRuntime", "path": "Sources/NodeRuntime", "target_dependencies": ["HACore", "Quorum", "Replication"]},
            {"name": "Simulation", "path": "Sources/Simulation", "target_dependencies": ["NodeRuntime"], "product_dependencies": ["NIOCore"]},
            {"name": "Shell", "path": "Sources/Shell", "target_dependencies": ["HACore"], "product_dependencies": ["NIOPosix", "TOMLKit"]},
        ]}
        v, _, files = run(good, tmp)
        expect(v == [] and files == 5, f"a clean synthetic package passes ({len(v)} violations, {files} pure files)")

        # A bad graph: Quorum reaches the shell target (and through it NIOPosix); HACore a product.
        bad = json.loads(json.dumps(good))
        bad["targets"][1]["target_dependencies"] = ["HACore", "Shell"]
        bad["targets"][0]["product_dependencies"] = ["NIOCore", "Logging"]
        v = check_graph(bad, PURE, ALLOWED)
        for line in v:
            print("    " + line)
        expect(any("Quorum depends on target Shell (Quorum -> Shell)" in l for l in v), "a pure target depending on a shell target is rejected")
        expect(any("Quorum depends on product NIOPosix (Quorum -> Shell -> NIOPosix)" in l for l in v), "a transitive NIOPosix is rejected, with its path")
        expect(any("HACore depends on product Logging" in l for l in v), "a pure target's own I/O product is rejected")
        v = check_graph({"targets": [t for t in good["targets"] if t["name"] != "Quorum"]}, PURE, ALLOWED)
        expect(any("pure target Quorum is missing" in l for l in v), "a missing pure target is reported, not skipped")

        # A bad source: forbidden imports in every spelling, in a pure target.
        write("Sources/Replication/Bad.swift",
              "import HACore\n#if canImport(Glibc)\n@preconcurrency import Glibc\n#endif\nimport struct Foundation.Data\n"
              "  @testable import NIOPosix\nimport TOMLKit\nimport ArgumentParser\n")
        v, _, _ = run(good, tmp)
        for line in v:
            print("    " + line)
        for lineno, module in [(3, "Glibc"), (5, "Foundation"), (6, "NIOPosix"), (7, "TOMLKit")]:
            expect(any(f"Sources/Replication/Bad.swift:{lineno}: pure target Replication imports {module} (I/O)" in l for l in v),
                   f"import of {module} is rejected with file and line")
        expect(any("Bad.swift:8:" in l and "ArgumentParser" in l for l in v), "an import outside the allowlist is rejected")
        expect(not any("Good.swift" in l or "IO.swift" in l for l in v), "a commented import and a shell target's imports are not reported")
        expect(len(v) == 5, f"exactly the five bad imports are reported ({len(v)})")

    if failures:
        print(f"purity self-test: FAILED, {len(failures)} of the checker's own checks failed")
        return 1
    print("purity self-test: OK, the checker rejects a bad dependency graph and a forbidden import")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if sys.argv[1:]:
        print("usage: scripts/check-purity.sh [--self-test]", file=sys.stderr)
        return 2
    described = subprocess.run(["swift", "package", "describe", "--type", "json"], capture_output=True, text=True)
    if described.returncode != 0:
        sys.stderr.write(described.stderr)
        print("purity: FAILED, `swift package describe` did not run")
        return 1
    # Resolution messages may precede the JSON document.
    text = described.stdout
    describe = json.loads(text[text.index("{"):])
    violations, present, files = run(describe, os.getcwd())
    for line in violations:
        print(line)
    if violations:
        print(f"purity: FAILED, {len(violations)} violation(s) in pure targets {', '.join(present)}")
        return 1
    print(f"purity: OK, pure targets {', '.join(present)} ({files} files) reach only {', '.join(sorted(ALLOWED))} "
          f"and import no I/O module")
    return 0


sys.exit(main())
PY
