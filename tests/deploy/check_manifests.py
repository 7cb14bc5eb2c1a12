#!/usr/bin/python3
"""Checks that what deploy/ runs is what the binaries accept: a renamed flag, port or health
service breaks this test instead of a deployment.

    tests/deploy/check_manifests.py --gradserve BIN --optimizer BIN --gradclient BIN --source DIR

Reads deploy/Dockerfile (ENTRYPOINT, HEALTHCHECK, ENV, EXPOSE, where the digits data set is
exported), deploy/compose.yaml and every manifest deploy/k8s/kustomization.yaml lists, and
checks, for every container:
  - every --flag in its entrypoint, command/args and healthcheck appears in the `--help` of the
    binary it runs (gradserve, gradserve-optimizer, gradclient and its subcommand), takes a value
    when one follows, is one of the listed choices when the help lists them, and is given twice
    only if the help marks it repeatable (gradserve refuses a second --listen);
  - it listens on every interface, and every port it publishes or declares, and every probe's
    and healthcheck's port, is its gRPC (--listen) or metrics (--metrics-listen) port;
  - every gRPC probe's service name is answered SERVING by the real binary (started here);
  - every environment variable is one the image sets (Dockerfile ENV) or a binary reads ($NAME
    in its --help), or one the container's own args expand (Kubernetes $(NAME));
  - the optimizer's --gradserve targets name a compose service or Kubernetes Service that
    reaches gradserve's gRPC port, its --state-dir is a writable volume, its --run file parses
    as a gradserve.optimizer.v1.RunSpec equal to deploy/runs/digits.json, and the data set files
    that run names under --data-dir are the ones the Dockerfile exports;
  - the stop grace (compose stop_grace_period, terminationGracePeriodSeconds) exceeds
    --drain-delay + --shutdown-grace;
  - Kubernetes: Services, the HPA and the PDB select or name workloads that exist, Service
    target ports and the Prometheus port annotation resolve to container ports, and
    kustomization.yaml lists every manifest in deploy/k8s.
Then, to show the flag check can fail, it removes each flag the files use from its binary's
help in turn and expects an error each time.

Needs python3-yaml, python3-grpcio, python3-protobuf, protoc and grpc_python_plugin.
"""

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

GRADSERVE = "gradserve"
OPTIMIZER = "gradserve-optimizer"
GRADCLIENT = "gradclient"
ANY_ADDRESS = {"0.0.0.0", "[::]", "::"}


# ---- what the binaries accept --------------------------------------------------------------

class Help:
    """One binary's (or subcommand's) CLI11 --help: its options, their defaults and choices."""

    def __init__(self, name, text):
        self.name = name
        self.flags = {}        # "--listen" -> {"value": bool, "repeatable": bool, "choices", "default"}
        self.subcommands = set()
        self.env = set(re.findall(r"\b(GRADSERVE_[A-Z0-9_]+)\b", text))
        section = None
        for line in text.splitlines():
            if re.match(r"^\S.*:$", line):
                section = line.strip()[:-1]
                continue
            if section == "Subcommands":
                m = re.match(r"^\s+([a-z][\w-]*)\s", line + " ")
                if m:
                    self.subcommands.add(m.group(1))
                continue
            m = re.match(r"^\s+(?:-\w,)?(--[\w-]+)(?:,-\w)?(.*)$", line)
            if not m:
                continue
            rest = m.group(2)
            spec = rest.split("  ")[0].strip() if rest.startswith(" ") else ""
            info = {"value": bool(re.match(r"[A-Z]+\b", spec)),
                    "repeatable": "..." in spec.split()[1:2] or spec.endswith("..."),
                    "choices": None, "default": None}
            c = re.search(r":\{([^}]*)\}", spec)
            if c:
                info["choices"] = set(c.group(1).split(","))
            d = re.search(r"=(\S+)", spec)
            if d:
                info["default"] = d.group(1)
            self.flags[m.group(1)] = info

    def without(self, flag):
        """A copy that does not know `flag`: what a rename in the binary looks like."""
        other = Help.__new__(Help)
        other.__dict__ = dict(self.__dict__)
        other.flags = {k: v for k, v in self.flags.items() if k != flag}
        return other


def read_help(argv):
    out = subprocess.run(argv + ["--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=30)
    if out.returncode != 0:
        sys.exit(f"check_manifests: {' '.join(argv)} --help exited {out.returncode}:\n{out.stdout}")
    return out.stdout


# ---- the image, from its Dockerfile ------------------------------------------------------------

def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    result, current = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            current += line
            word, _, rest = current.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
            current = ""
    return result


class Image:
    def __init__(self, dockerfile):
        self.env = {}
        self.expose = set()
        self.entrypoint = None
        self.cmd = []
        self.healthcheck = None
        self.data_files = set()   # absolute paths of the data set files in the runtime image
        self._entrypoint_cache = {}
        stages = []
        export_dir = None
        for word, rest in dockerfile_instructions(dockerfile):
            if word == "FROM":
                stages.append(rest.split()[-1] if " AS " in rest.upper() else "")
                self.env, self.expose = {}, set()   # the last stage is the image
            elif word == "ENV":
                for item in shlex.split(rest):
                    k, _, v = item.partition("=")
                    self.env[k] = v
            elif word == "EXPOSE":
                self.expose.update(int(p.split("/")[0]) for p in rest.split())
            elif word == "ENTRYPOINT":
                self.entrypoint = json.loads(rest)
            elif word == "CMD":
                self.cmd = json.loads(rest)
            elif word == "HEALTHCHECK":
                self.healthcheck = shlex.split(rest.split(" CMD ", 1)[1].split("||")[0])
            elif word == "RUN" and "export_digits.py" in rest:
                words = shlex.split(rest.split("export_digits.py", 1)[1])
                export_dir = [w for w in words if not w.startswith("-")][-1]
            elif word == "COPY" and "--from=digits" in rest and export_dir:
                src, dst = rest.split()[-2:]
                if export_dir.startswith(src.rstrip("/") + "/"):
                    image_dir = os.path.join(dst, export_dir[len(src.rstrip("/")) + 1:])
                    sys.path.insert(0, os.path.dirname(dockerfile))
                    import export_digits  # the names the script writes
                    self.data_files = {os.path.join(image_dir, export_digits.INPUTS_FILE),
                                       os.path.join(image_dir, export_digits.TARGETS_FILE)}
        if not self.entrypoint or not self.healthcheck:
            sys.exit("check_manifests: Dockerfile has no ENTRYPOINT or HEALTHCHECK")

    def run_entrypoint(self, env, args):
        """gradserve's argv as the image's ENTRYPOINT gives it, for this env and CMD/args.

        The entrypoint runs for real, in /bin/sh, with a stand-in gradserve on PATH that prints
        its arguments: the shell's own expansion, not an imitation of it."""
        key = json.dumps([sorted((k, v) for k, v in env.items() if v is not None), list(args)])
        if key not in self._entrypoint_cache:
            self._entrypoint_cache[key] = self._run_entrypoint(env, args)
        return list(self._entrypoint_cache[key])

    def _run_entrypoint(self, env, args):
        with tempfile.TemporaryDirectory() as bindir:
            fake = os.path.join(bindir, GRADSERVE)
            with open(fake, "w") as f:
                f.write("#!/usr/bin/python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
            os.chmod(fake, 0o755)
            env = {k: v for k, v in env.items() if v is not None}
            env["PATH"] = bindir + ":/usr/bin:/bin"
            out = subprocess.run(self.entrypoint + list(args), env=env, text=True, check=True,
                                 stdout=subprocess.PIPE, timeout=30).stdout
        return json.loads(out)


def expand(text, env):
    """${VAR} and $VAR as the healthcheck's shell expands them."""
    return re.sub(r"\$\{?(\w+)\}?", lambda g: env.get(g.group(1)) or "", text)


# ---- containers, from compose and Kubernetes -------------------------------------------------

class Container:
    def __init__(self, where, binary, argv, env, ports, health, probes, mounts, read_only,
                 grace, runs_sources):
        self.where = where            # "compose service optimizer", ...
        self.binary = binary          # GRADSERVE or OPTIMIZER
        self.argv = argv              # its arguments, entrypoint's included
        self.env = env                # name -> value (None: from elsewhere)
        self.ports = ports            # [(port, what)] it publishes or declares
        self.health = health          # [gradclient argv]
        self.probes = probes          # [(port, service, what)]
        self.mounts = mounts          # path -> {"writable": bool, "files": {name: text}}
        self.read_only = read_only
        self.grace = grace            # seconds before SIGKILL, or None
        self.runs_sources = runs_sources


# (binary, flag) for every flag the files use, so that each can be "renamed" in turn.
USED_FLAGS = set()


def parse_argv(argv, helpx, where, errors):
    """{flag: [values]} of argv, checking each flag against the binary's help."""
    values = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--"):
            errors.append(f"{where}: argument {tok!r} is not a --flag (positional arguments "
                          f"are not accepted)")
            continue
        name, eq, val = tok.partition("=")
        info = helpx.flags.get(name)
        if info is None:
            errors.append(f"{where}: {helpx.name} has no flag {name} (not in its --help)")
            continue
        USED_FLAGS.add((helpx.name, name))
        if info["value"] and not eq:
            if i >= len(argv):
                errors.append(f"{where}: {name} needs a value")
                continue
            val = argv[i]
            i += 1
        elif not info["value"]:
            val = None
        if name in values and not info["repeatable"]:
            errors.append(f"{where}: {name} given twice; {helpx.name} accepts it once")
        if info["choices"] and val not in info["choices"]:
            errors.append(f"{where}: {name} {val!r} is not one of {sorted(info['choices'])}")
        values.setdefault(name, []).append(val)
    return values


def host_port(address, where, errors):
    m = re.match(r"^(\[[^\]]*\]|[^:]*):(\d+)$", address or "")
    if not m:
        errors.append(f"{where}: cannot read host:port from {address!r}")
        return None, None
    return m.group(1), int(m.group(2))


def seconds(value):
    """Compose durations ("30s", "1m30s") and Kubernetes integers, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total = 0.0
    for num, unit in re.findall(r"([\d.]+)(ms|s|m|h)", value):
        total += float(num) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


class Checker:
    def __init__(self, helps, image, source, runspec_cls, json_format, health_services):
        self.helps = helps
        self.image = image
        self.source = source
        self.RunSpec = runspec_cls
        self.json_format = json_format
        self.health_services = health_services   # binary -> set of names served SERVING
        self.errors = []
        try:
            self.expected_run = json_format.Parse(
                open(os.path.join(source, "deploy/runs/digits.json")).read(), runspec_cls())
        except json_format.ParseError as e:
            self.expected_run = None
            self.err(f"deploy/runs/digits.json is not a RunSpec: {e}")

    def err(self, msg):
        self.errors.append(msg)

    # The gRPC and metrics ports a container's binary listens on, from its flags.
    def listen_ports(self, c, flags):
        h = self.helps[c.binary]
        listen = (flags.get("--listen") or [h.flags.get("--listen", {}).get("default")])[0]
        host, port = host_port(listen, f"{c.where}: --listen", self.errors)
        if host is not None and host not in ANY_ADDRESS:
            self.err(f"{c.where}: listens on {listen}, unreachable from outside the container "
                     f"(use 0.0.0.0)")
        metrics = None
        if flags.get("--metrics-listen"):
            _, metrics = host_port(flags["--metrics-listen"][0], f"{c.where}: --metrics-listen",
                                   self.errors)
        return port, metrics

    def flag_seconds(self, c, flags, name):
        info = self.helps[c.binary].flags.get(name)
        value = (flags.get(name) or [info["default"] if info else None])[0]
        try:
            return float(value) if value is not None else 0.0
        except ValueError:
            return 0.0

    def check_container(self, c, services):
        h = self.helps[c.binary]
        flags = parse_argv(c.argv, h, f"{c.where} ({c.binary})", self.errors)
        grpc_port, metrics_port = self.listen_ports(c, flags)
        own_ports = {grpc_port, metrics_port} - {None}
        for port, what in c.ports:
            if port not in own_ports:
                self.err(f"{c.where}: {what} {port} is neither its gRPC port {grpc_port} nor its "
                         f"metrics port {metrics_port}")
        for argv in c.health:
            self.check_gradclient(argv, grpc_port, f"{c.where}: healthcheck")
        for port, service, what in c.probes:
            if port != grpc_port:
                self.err(f"{c.where}: {what} probes port {port}, but {c.binary} listens on "
                         f"{grpc_port}")
            if service not in self.health_services.get(c.binary, set()):
                self.err(f"{c.where}: {what} asks for health service {service!r}, which "
                         f"{c.binary} does not report SERVING")
        readable_env = set(self.image.env) | {v for hh in self.helps.values() for v in hh.env}
        expanded = {n for a in c.argv for n in re.findall(r"\$\((\w+)\)", a)}
        for name in c.env:
            if name not in readable_env and name not in expanded:
                self.err(f"{c.where}: environment variable {name} is read by neither the image "
                         f"nor the binaries")
        for name in expanded:
            if name not in c.env:
                self.err(f"{c.where}: $({name}) in its arguments, but no env {name}")
        if c.grace is not None:
            need = self.flag_seconds(c, flags, "--drain-delay") + \
                self.flag_seconds(c, flags, "--shutdown-grace")
            if c.grace <= need:
                self.err(f"{c.where}: {c.grace:g} s to stop, not more than --drain-delay + "
                         f"--shutdown-grace = {need:g} s: calls would be killed mid-way")
        if c.binary == OPTIMIZER:
            self.check_optimizer(c, flags, services)
        return grpc_port

    def check_gradclient(self, argv, grpc_port, where):
        if not argv or os.path.basename(argv[0]) != GRADCLIENT:
            self.err(f"{where}: runs {argv[:1]}, not gradclient")
            return
        h = self.helps[GRADCLIENT]
        sub = [i for i, a in enumerate(argv[1:], 1) if a in h.subcommands]
        if not sub:
            self.err(f"{where}: no gradclient subcommand among {argv[1:]} "
                     f"(it has {sorted(h.subcommands)})")
            return
        k = sub[0]
        flags = parse_argv(argv[1:k], h, where, self.errors)
        parse_argv(argv[k + 1:], self.helps[f"{GRADCLIENT} {argv[k]}"], where, self.errors)
        target = (flags.get("--target") or [h.flags.get("--target", {}).get("default")])[0]
        host, port = host_port(target, f"{where}: --target", self.errors)
        if port is not None and port != grpc_port:
            self.err(f"{where}: --target {target}, but the server listens on port {grpc_port}")

    def check_optimizer(self, c, flags, services):
        # Where gradserve is: each target must reach a gradserve gRPC port.
        for target in flags.get("--gradserve", []):
            name = target
            if target.startswith("dns:///"):
                name = target[len("dns:///"):]
            host, port = host_port(name, f"{c.where}: --gradserve", self.errors)
            if host is None:
                continue
            short = host.split(".")[0]
            if short not in services:
                self.err(f"{c.where}: --gradserve {target}: no service {short!r} "
                         f"(there are {sorted(services)})")
            elif port not in services[short]:
                self.err(f"{c.where}: --gradserve {target}: {short} does not reach gradserve on "
                         f"port {port} (it does on {sorted(services[short])})")
        state = (flags.get("--state-dir") or [""])[0]
        if not state:
            self.err(f"{c.where}: no --state-dir: a restart would lose every run")
        elif c.read_only and not c.mounts.get(state, {}).get("writable"):
            self.err(f"{c.where}: --state-dir {state} is not a writable volume of a read-only "
                     f"container")
        data_dir = (flags.get("--data-dir") or [""])[0]
        runs = flags.get("--run", [])
        if not runs:
            self.err(f"{c.where}: no --run: the optimizer would start with nothing to train")
        for run in runs:
            text = None
            for path, mount in c.mounts.items():
                if run.startswith(path.rstrip("/") + "/") or run == path:
                    text = mount.get("files", {}).get(os.path.relpath(run, path)
                                                      if run != path else ".")
            if text is None:
                self.err(f"{c.where}: --run {run} is not a file mounted into the container")
                continue
            try:
                spec = self.json_format.Parse(text, self.RunSpec())
            except Exception as e:  # json_format.ParseError, or not JSON at all
                self.err(f"{c.where}: --run {run} is not a RunSpec: {e}")
                continue
            if spec != self.expected_run:
                self.err(f"{c.where}: --run {run} differs from deploy/runs/digits.json")
            for field in ("inputs", "targets"):
                rel = getattr(spec.dataset, field)
                path = os.path.normpath(os.path.join(data_dir, rel))
                if path not in self.image.data_files:
                    self.err(f"{c.where}: the run's dataset.{field} is {path} (--data-dir "
                             f"{data_dir!r}), but the image holds {sorted(self.image.data_files)}")

    # ---- the image on its own (docker run IMAGE) -----------------------------------------------

    def check_image(self):
        c = Container("Dockerfile", GRADSERVE, self.image.run_entrypoint(self.image.env,
                                                                         self.image.cmd),
                      dict(self.image.env), [],
                      [[expand(a, self.image.env) for a in self.image.healthcheck]], [], {}, False,
                      None, None)
        grpc_port = self.check_container(c, {})
        flags = parse_argv(c.argv, self.helps[GRADSERVE], c.where, [])
        _, metrics = self.listen_ports(c, flags)
        optimizer_default = self.helps[OPTIMIZER].flags.get("--listen", {}).get("default")
        _, optimizer_port = host_port(optimizer_default, "gradserve-optimizer --listen default",
                                      self.errors)
        for port in sorted(self.image.expose - {grpc_port, metrics, optimizer_port}):
            self.err(f"Dockerfile: EXPOSE {port} is no port gradserve or gradserve-optimizer "
                     f"listens on by default")

    # ---- compose ------------------------------------------------------------------------------

    def compose_containers(self, path):
        doc = yaml.safe_load(open(path))
        base = os.path.dirname(path)
        volumes = set((doc.get("volumes") or {}).keys())
        out = []
        for name, svc in doc["services"].items():
            where = f"compose service {name}"
            entry = svc.get("entrypoint")
            env = dict(self.image.env)
            environment = svc.get("environment") or {}
            if isinstance(environment, list):
                environment = dict(e.partition("=")[::2] for e in environment)
            env.update({k: str(v) for k, v in environment.items()})
            command = svc.get("command")
            command = shlex.split(command) if isinstance(command, str) else list(command or [])
            if entry is None:
                binary = GRADSERVE
                argv = self.image.run_entrypoint(env, command)
            else:
                entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
                binary = os.path.basename(entry[0])
                argv = entry[1:] + command
            if binary not in (GRADSERVE, OPTIMIZER):
                self.err(f"{where}: runs {binary}, neither gradserve nor gradserve-optimizer")
                continue
            ports = []
            for p in svc.get("ports") or []:
                ports.append((int(str(p).split(":")[-1].split("/")[0]), "published port"))
            health = []
            test = (svc.get("healthcheck") or {}).get("test")
            if test is None and binary == GRADSERVE:
                health.append([expand(a, env) for a in self.image.healthcheck])
            elif test is None:
                self.err(f"{where}: no healthcheck, and the image's checks gradserve's port")
            elif isinstance(test, list) and test[0] == "CMD":
                health.append(test[1:])
            elif isinstance(test, list) and test[0] == "NONE":
                pass
            else:
                self.err(f"{where}: write the healthcheck as [\"CMD\", ...] so it can be checked")
            mounts = {"/tmp": {"writable": True}}
            for t in svc.get("tmpfs") or []:
                mounts[t.split(":")[0]] = {"writable": True}
            for v in svc.get("volumes") or []:
                src, dst, *opt = v.split(":")
                ro = "ro" in (opt[0].split(",") if opt else [])
                if src in volumes:
                    mounts[dst] = {"writable": not ro}
                else:
                    host = os.path.join(base, src)
                    if not os.path.exists(host):
                        self.err(f"{where}: bind mount {src} does not exist next to compose.yaml")
                        continue
                    mounts[dst] = {"writable": not ro,
                                   "files": {".": open(host).read()} if os.path.isfile(host) else {}}
            grace = svc.get("stop_grace_period")
            out.append((name, Container(where, binary, argv, env, ports, health, [], mounts,
                                        bool(svc.get("read_only")),
                                        seconds(grace) if grace is not None else 10.0, None)))
            image = re.sub(r"\$\{GRADSERVE_IMAGE:-([^}]*)\}", r"\1", str(svc.get("image")))
            if image != "gradserve:latest" or "build" not in svc:
                self.err(f"{where}: image {svc.get('image')} without the build of deploy/Dockerfile")
        return out

    def check_compose(self, path):
        containers = self.compose_containers(path)
        grpc = {}
        for name, c in containers:
            if c.binary == GRADSERVE:
                flags = parse_argv(c.argv, self.helps[GRADSERVE], c.where, [])
                port, _ = self.listen_ports(c, flags)
                grpc[name] = {port}
        for _, c in containers:
            self.check_container(c, grpc)

    # ---- Kubernetes ----------------------------------------------------------------------------

    def check_k8s(self, k8s_dir):
        kust = yaml.safe_load(open(os.path.join(k8s_dir, "kustomization.yaml")))
        listed = set(kust.get("resources", []))
        present = {f for f in os.listdir(k8s_dir)
                   if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"}
        for f in sorted(present - listed):
            self.err(f"k8s: {f} is not listed in kustomization.yaml's resources")
        for f in sorted(listed - present):
            self.err(f"k8s: kustomization.yaml lists {f}, which does not exist")
        docs = []
        for f in sorted(listed & present):
            docs.extend((f, d) for d in yaml.safe_load_all(open(os.path.join(k8s_dir, f))) if d)
        by_kind = {}
        for f, d in docs:
            by_kind.setdefault(d["kind"], []).append((f, d))
        config_maps = {d["metadata"]["name"]: d.get("data", {})
                       for _, d in by_kind.get("ConfigMap", [])}
        workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])

        def selects(selector, labels):
            return all(labels.get(k) == v for k, v in selector.items())

        # Pods: each workload's containers, with their named ports.
        pods = []   # (workload doc, pod labels, [(Container, {port name: number}, ports)])
        for f, w in workloads:
            tmpl = w["spec"]["template"]
            labels = tmpl["metadata"].get("labels", {})
            if not selects(w["spec"]["selector"]["matchLabels"], labels):
                self.err(f"k8s {f}: {w['metadata']['name']}'s selector does not match its pods")
            spec = tmpl["spec"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for t in w["spec"].get("volumeClaimTemplates", []):
                volumes[t["metadata"]["name"]] = {"persistentVolumeClaim": True}
            cs = []
            for ctr in spec["containers"]:
                where = f"k8s {f} {w['kind']} {w['metadata']['name']} container {ctr['name']}"
                env = dict(self.image.env)
                for e in ctr.get("env", []):
                    env[e["name"]] = e.get("value")
                if ctr.get("command"):
                    binary = os.path.basename(ctr["command"][0])
                    argv = list(ctr["command"][1:]) + list(ctr.get("args", []))
                else:
                    binary = GRADSERVE
                    argv = self.image.run_entrypoint(env, ctr.get("args", []))
                named = {p["name"]: p["containerPort"] for p in ctr.get("ports", []) if "name" in p}
                ports = [(p["containerPort"], "containerPort") for p in ctr.get("ports", [])]
                probes = []
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = ctr.get(kind)
                    if not p:
                        continue
                    if "grpc" not in p:
                        self.err(f"{where}: {kind} is not a gRPC probe")
                        continue
                    port = p["grpc"]["port"]
                    probes.append((named.get(port, port), p["grpc"].get("service", ""), kind))
                mounts = {}
                for m in ctr.get("volumeMounts", []):
                    v = volumes.get(m["name"])
                    if v is None:
                        self.err(f"{where}: mounts volume {m['name']}, which the pod lacks")
                        continue
                    files = {}
                    if "configMap" in v:
                        name = v["configMap"]["name"]
                        if name not in config_maps:
                            self.err(f"{where}: volume {m['name']} names ConfigMap {name}, "
                                     f"which kustomization.yaml does not create")
                        files = config_maps.get(name, {})
                    mounts[m["mountPath"]] = {"writable": not m.get("readOnly") and
                                              "configMap" not in v, "files": files}
                read_only = ctr.get("securityContext", {}).get("readOnlyRootFilesystem", False)
                grace = spec.get("terminationGracePeriodSeconds", 30)
                c = Container(where, binary, argv, env, ports, [], probes, mounts, read_only,
                              float(grace), None)
                if binary not in (GRADSERVE, OPTIMIZER):
                    self.err(f"{where}: runs {binary}, neither gradserve nor gradserve-optimizer")
                    continue
                cs.append((c, named, ctr))
            pods.append((f, w, labels, cs))
            # Prometheus scrapes the port the annotation names: it must be the metrics port.
            ann = tmpl["metadata"].get("annotations", {})
            if "prometheus.io/port" in ann:
                ok = False
                for c, _, _ in cs:
                    flags = parse_argv(c.argv, self.helps[c.binary], c.where, [])
                    _, metrics = self.listen_ports(c, flags) if c.binary == GRADSERVE else (0, None)
                    ok = ok or metrics == int(ann["prometheus.io/port"])
                if not ok:
                    self.err(f"k8s {f}: prometheus.io/port {ann['prometheus.io/port']} is no "
                             f"container's metrics port")

        # Services: each port must reach a container port of a selected pod.
        services = {}   # Service name -> {port: binary the port reaches}
        for f, s in by_kind.get("Service", []):
            name = s["metadata"]["name"]
            selected = [p for p in pods if selects(s["spec"]["selector"], p[2])]
            if not selected:
                self.err(f"k8s {f}: Service {name} selects no pods")
            services[name] = {}
            for sp in s["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                reached = None
                for _, _, _, cs in selected:
                    for c, named, ctr in cs:
                        number = named.get(target, target)
                        if number in [p for p, _ in c.ports]:
                            reached = c.binary
                            flags = parse_argv(c.argv, self.helps[c.binary], c.where, [])
                            grpc, _ = self.listen_ports(c, flags)
                            if number == grpc:
                                services[name].setdefault(sp["port"], c.binary)
                if reached is None:
                    self.err(f"k8s {f}: Service {name} port {sp['port']} targets {target!r}, "
                             f"no container port of its pods")
        gradserve_services = {n: {p for p, b in ports.items() if b == GRADSERVE}
                              for n, ports in services.items()}
        for f, w, labels, cs in pods:
            for c, _, _ in cs:
                self.check_container(c, gradserve_services)
            if w["kind"] == "StatefulSet" and w["spec"].get("serviceName") not in services:
                self.err(f"k8s {f}: StatefulSet serviceName {w['spec'].get('serviceName')} is "
                         f"not a Service here")

        names = {(w["kind"], w["metadata"]["name"]) for _, w in workloads}
        for f, hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            if (ref["kind"], ref["name"]) not in names:
                self.err(f"k8s {f}: the HPA scales {ref['kind']} {ref['name']}, which is not here")
            for _, w in workloads:
                if (w["kind"], w["metadata"]["name"]) == (ref["kind"], ref["name"]) and \
                        "replicas" in w["spec"]:
                    self.err(f"k8s {f}: {ref['name']} sets replicas, which every kubectl apply "
                             f"would reset under the HPA")
            pdb_min = [p["spec"].get("minAvailable", 0) for _, p in by_kind.get(
                "PodDisruptionBudget", [])]
            if pdb_min and hpa["spec"].get("minReplicas", 1) <= max(pdb_min):
                self.err(f"k8s {f}: minReplicas {hpa['spec'].get('minReplicas', 1)} leaves no "
                         f"room for the PDB's minAvailable {max(pdb_min)}")
        for f, pdb in by_kind.get("PodDisruptionBudget", []):
            sel = pdb["spec"]["selector"]["matchLabels"]
            if not any(selects(sel, labels) for _, _, labels, _ in pods):
                self.err(f"k8s {f}: PodDisruptionBudget selects no pods")


# ---- health services the binaries really serve ----------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_health(binary, extra, names):
    """The subset of `names` the binary's grpc.health.v1 answers SERVING, started here.

    HealthCheckRequest and HealthCheckResponse are one field each, so they are written and read
    by hand rather than with generated stubs that would have to be named grpc.health.v1."""
    import grpc

    def request(name):   # field 1 (service), length-delimited
        data = name.encode()
        assert len(data) < 128
        return b"\x0a" + bytes([len(data)]) + data if data else b""

    def status(reply):   # field 1 (status), varint; absent = 0 (UNKNOWN)
        return reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0

    serving = 1
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}"] + extra,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            # Connect only once the port is open: a channel that fails first backs off for
            # seconds before it tries again.
            deadline = time.time() + 20
            while time.time() < deadline:
                if proc.poll() is not None:
                    log.seek(0)
                    sys.exit(f"check_manifests: {binary} exited at start-up:\n"
                             f"{log.read().decode(errors='replace')}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            served = set()
            pending = set(names)
            while pending and time.time() < deadline:
                for name in list(pending):
                    try:
                        if status(check(request(name), timeout=1)) == serving:
                            served.add(name)
                        pending.discard(name)
                    except grpc.RpcError as e:
                        if e.code() == grpc.StatusCode.NOT_FOUND:
                            pending.discard(name)
                        elif proc.poll() is not None:
                            log.seek(0)
                            sys.exit(f"check_manifests: {binary} exited at start-up:\n"
                                     f"{log.read().decode(errors='replace')}")
                        else:
                            time.sleep(0.2)
            channel.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return served


def generate_stubs(source, out):
    subprocess.run([os.path.join(source, "client/python/generate.sh"), out], check=True,
                   stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gradserve", required=True)
    parser.add_argument("--optimizer", required=True)
    parser.add_argument("--gradclient", required=True)
    parser.add_argument("--source", required=True, help="the repository root")
    args = parser.parse_args()
    source = os.path.abspath(args.source)

    helps = {GRADSERVE: Help(GRADSERVE, read_help([args.gradserve])),
             OPTIMIZER: Help(OPTIMIZER, read_help([args.optimizer])),
             GRADCLIENT: Help(GRADCLIENT, read_help([args.gradclient]))}
    for sub in helps[GRADCLIENT].subcommands:
        helps[f"{GRADCLIENT} {sub}"] = Help(f"{GRADCLIENT} {sub}",
                                            read_help([args.gradclient, sub]))
    for b in (GRADSERVE, OPTIMIZER):
        if "--listen" not in helps[b].flags:
            sys.exit(f"check_manifests: cannot read {b}'s --help (no --listen):\n")

    with tempfile.TemporaryDirectory() as stubs:
        generate_stubs(source, stubs)
        # The stubs' own packages must win over a grpc or gradserve directory elsewhere; the
        # real grpc module is found first, so the health stubs are imported from their path.
        sys.path.insert(0, stubs)
        from google.protobuf import json_format
        from gradserve.optimizer.v1 import optimizer_pb2

        image = Image(os.path.join(source, "deploy/Dockerfile"))
        # Which probe service names to try: every one the manifests use, plus "".
        wanted = {""}
        for f in os.listdir(os.path.join(source, "deploy/k8s")):
            for d in yaml.safe_load_all(open(os.path.join(source, "deploy/k8s", f))):
                text = json.dumps(d)
                wanted.update(re.findall(r'"service": "([^"]*)"', text))
        health = {GRADSERVE: served_health(args.gradserve, ["--shutdown-grace", "1"], wanted),
                  OPTIMIZER: served_health(args.optimizer, ["--shutdown-grace", "1"], wanted)}
        print(f"health services served: gradserve {sorted(health[GRADSERVE])}, "
              f"gradserve-optimizer {sorted(health[OPTIMIZER])}")

        def run_checks(helps_now):
            c = Checker(helps_now, image, source, optimizer_pb2.RunSpec, json_format, health)
            c.check_image()
            c.check_compose(os.path.join(source, "deploy/compose.yaml"))
            c.check_k8s(os.path.join(source, "deploy/k8s"))
            return c

        checker = run_checks(helps)
        for e in checker.errors:
            print("ERROR:", e)
        if checker.errors:
            print(f"check_manifests: {len(checker.errors)} error(s)")
            return 1

        # Every flag the files use, removed from its binary in turn, must be caught.
        used = set(USED_FLAGS)
        missed = []
        for binary, flag in sorted(used):
            mutated = dict(helps)
            mutated[binary] = helps[binary].without(flag)
            if not run_checks(mutated).errors:
                missed.append(f"{binary} {flag}")
        if missed:
            print("check_manifests: renaming these flags would go unnoticed:", ", ".join(missed))
            return 1
        print(f"check_manifests: compose.yaml, k8s/ and the Dockerfile use {len(used)} flags, "
              f"all accepted; each one renamed is caught")
        return 0


if __name__ == "__main__":
    sys.exit(main())
