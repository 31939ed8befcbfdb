"""Guard the protobuf wire format against breaking changes (proto/wire.lock.json).

The snapshot lists every message's fields (name, number, type, label, oneof, presence), every enum's
values and every service's methods, for all files under proto/. ``check`` compares the .proto files
against it:

* breaking (always refused): a removed or renamed message, enum, service or method; a removed
  field whose number is not ``reserved``; a field renumbered, renamed, retyped, relabelled, moved
  in or out of a oneof, or changed in presence; an enum value removed or renumbered; a method's
  types or streaming changed;
* additive (accepted on purpose): new files, messages, fields, enum values, services, methods.
  ``python3 tools/wire_lock.py --update`` writes the new snapshot; commit it with the .proto change.

A breaking change means a new package version (``evcore.v2``), not an edit of ``evcore.v1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
LOCK = PROTO / "wire.lock.json"

FDP = descriptor_pb2.FieldDescriptorProto


def describe(proto_root: Path = PROTO) -> descriptor_pb2.FileDescriptorSet:
    """Compile every .proto under ``proto_root`` (with comments) into a FileDescriptorSet."""
    from grpc_tools import protoc

    sources = sorted(proto_root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            *[str(s) for s in sources],
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {len(sources)} files under {proto_root}")
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds


def _field(f: Any, msg: Any) -> dict[str, Any]:
    oneof = ""
    if f.HasField("oneof_index") and not f.proto3_optional:
        oneof = msg.oneof_decl[f.oneof_index].name
    return {
        "name": f.name,
        "number": f.number,
        "type": FDP.Type.Name(f.type),
        "type_name": f.type_name,
        "label": FDP.Label.Name(f.label),
        "oneof": oneof,
        "optional": bool(f.proto3_optional),
    }


def snapshot(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, Any]:
    """A JSON-able description of the wire format of every message, enum and service."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    services: dict[str, Any] = {}

    def walk_enum(prefix: str, e: Any) -> None:
        enums[f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}

    def walk_msg(prefix: str, m: Any) -> None:
        full = f"{prefix}.{m.name}"
        messages[full] = {
            "fields": {str(f.number): _field(f, m) for f in m.field},
            "reserved_numbers": sorted(n for r in m.reserved_range for n in range(r.start, r.end)),
            "reserved_names": sorted(m.reserved_name),
        }
        for nested in m.nested_type:
            if not nested.options.map_entry:
                walk_msg(full, nested)
        for e in m.enum_type:
            walk_enum(full, e)

    for fd in fds.file:
        pkg = f".{fd.package}" if fd.package else ""
        for m in fd.message_type:
            walk_msg(pkg, m)
        for e in fd.enum_type:
            walk_enum(pkg, e)
        for s in fd.service:
            services[f"{pkg}.{s.name}"] = {
                meth.name: {
                    "input": meth.input_type,
                    "output": meth.output_type,
                    "client_streaming": bool(meth.client_streaming),
                    "server_streaming": bool(meth.server_streaming),
                }
                for meth in s.method
            }
    return {"messages": messages, "enums": enums, "services": services}


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(breaking, additive) differences from the snapshot ``old`` to ``new``."""
    breaking: list[str] = []
    additive: list[str] = []
    om, nm = old.get("messages", {}), new.get("messages", {})
    for name, o in om.items():
        n = nm.get(name)
        if n is None:
            breaking.append(f"message {name} removed")
            continue
        for num, of in o["fields"].items():
            nf = n["fields"].get(num)
            if nf is None:
                by_name = [f for f in n["fields"].values() if f["name"] == of["name"]]
                if by_name:
                    breaking.append(
                        f"{name}.{of['name']} renumbered {num} -> {by_name[0]['number']}"
                    )
                elif int(num) not in n["reserved_numbers"]:
                    breaking.append(
                        f"{name}.{of['name']} (field {num}) removed without reserving its number"
                    )
                continue
            for key in ("name", "type", "type_name", "label", "oneof", "optional"):
                if of.get(key) != nf.get(key):
                    breaking.append(
                        f"{name} field {num} ({of['name']}) changed {key}: "
                        f"{of.get(key)!r} -> {nf.get(key)!r}"
                    )
        for num, nf in n["fields"].items():
            if num not in o["fields"]:
                additive.append(f"{name}.{nf['name']} = {num} added")
    for name in nm.keys() - om.keys():
        additive.append(f"message {name} added")

    oe, ne = old.get("enums", {}), new.get("enums", {})
    for name, ov in oe.items():
        nv = ne.get(name)
        if nv is None:
            breaking.append(f"enum {name} removed")
            continue
        for vname, vnum in ov.items():
            if vname not in nv:
                breaking.append(f"enum {name} value {vname} = {vnum} removed")
            elif nv[vname] != vnum:
                breaking.append(f"enum {name} value {vname} renumbered {vnum} -> {nv[vname]}")
        for vname in nv.keys() - ov.keys():
            additive.append(f"enum {name} value {vname} = {nv[vname]} added")
    for name in ne.keys() - oe.keys():
        additive.append(f"enum {name} added")

    os_, ns = old.get("services", {}), new.get("services", {})
    for name, ometh in os_.items():
        nmeth = ns.get(name)
        if nmeth is None:
            breaking.append(f"service {name} removed")
            continue
        for mname, osig in ometh.items():
            nsig = nmeth.get(mname)
            if nsig is None:
                breaking.append(f"rpc {name}.{mname} removed")
            elif nsig != osig:
                breaking.append(f"rpc {name}.{mname} changed: {osig} -> {nsig}")
        for mname in nmeth.keys() - ometh.keys():
            additive.append(f"rpc {name}.{mname} added")
    for name in ns.keys() - os_.keys():
        additive.append(f"service {name} added")
    return sorted(breaking), sorted(additive)


def load_lock(path: Path = LOCK) -> dict[str, Any]:
    if not path.exists():
        return {"messages": {}, "enums": {}, "services": {}}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write_lock(snap: dict[str, Any], path: Path = LOCK) -> None:
    path.write_text(json.dumps(snap, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--update", action="store_true", help="accept additive changes: rewrite the lock"
    )
    args = ap.parse_args(argv)
    breaking, additive = compare(load_lock(), snapshot(describe()))
    for line in breaking:
        print(f"BREAKING: {line}")
    for line in additive:
        print(f"added:    {line}")
    if breaking:
        print(
            "breaking wire changes are refused; make a new package version instead", file=sys.stderr
        )
        return 1
    if args.update:
        write_lock(snapshot(describe()))
        print(f"wrote {LOCK.relative_to(ROOT)}")
        return 0
    if additive:
        print(
            "additive changes not yet accepted: run python3 tools/wire_lock.py --update",
            file=sys.stderr,
        )
        return 1
    print("wire format matches proto/wire.lock.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
