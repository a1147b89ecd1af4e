"""Write llm-appliance(1) from the CLI's own argparse parsers, so the page covers every command.

Each subcommand of `appliance.cli` (and each action below it, e.g. `ctl status`) becomes a
subsection with its usage line and options, taken from the same parsers `llm-appliance` runs;
FILES, ENVIRONMENT, EXIT STATUS and the operator's steps are written here. The build fails when a
command has no help text, so a new command cannot land undocumented.

Usage: python gen_manpage.py VERSION > llm-appliance.1
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys

from appliance import cli


def esc(text: str) -> str:
    """Roff-escape free text: backslashes, leading dots/quotes, hyphens in option names."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in ".'" else line for line in text.splitlines())


def usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip()
    return " ".join(text.removeprefix("usage:").split())


def option_lines(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):  # noqa: SLF001
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
            label = ", ".join(f"\\fB{esc(o)}\\fR" for o in action.option_strings) + esc(str(metavar))
        else:
            label = f"\\fI{esc(str(action.metavar or action.dest))}\\fR"
        help_text = (action.help or "").replace("%(default)s", str(action.default)).replace("%%", "%")
        out += [".TP", label, esc(help_text) if help_text else ""]
    return out


def subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    found = []
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            helps = {c.dest: c.help for c in action._choices_actions}  # noqa: SLF001
            found += [(name, sub, helps.get(name) or "") for name, sub in action.choices.items()]
    return found


def command_section(name: str, summary: str, module_name: str | None = None, title: str | None = None) -> list[str]:
    module = importlib.import_module(module_name or cli._SUBCOMMANDS[name][0])  # noqa: SLF001
    parser = argparse.ArgumentParser(prog=f"llm-appliance {name}", description=summary)
    getattr(module, f"add_arguments_{name}")(parser)
    lines = [".SS " + esc(title or f"llm-appliance {name}"), esc(summary), ".PP", f"\\fB{esc(usage(parser))}\\fR"]
    lines += option_lines(parser)
    for sub_name, sub, sub_help in subparsers(parser):
        if not sub_help:
            raise SystemExit(f"gen_manpage: `llm-appliance {name} {sub_name}` has no help text")
        lines += [".TP", f"\\fB{esc(sub_name)}\\fR", esc(sub_help), ".RS", ".PP",
                  f"\\fB{esc(usage(sub))}\\fR"]
        lines += option_lines(sub)
        lines += [".RE"]
    return lines


STATIC_TAIL = r"""
.SH FILES
.TP
\fI/etc/llm\-appliance/appliance.toml\fR
The daemon's configuration (every key with its default; a dpkg conffile, mode 0640 root:llm\-appliance).
Check an edit with \fBllm\-appliance config check\fR before \fBsystemctl restart llm\-appliance\fR.
.TP
\fI/lib/systemd/system/llm\-appliance.service\fR
The unit: Type=notify, watchdog, drain on SIGTERM. Local changes go in a drop\-in (\fBsystemctl edit llm\-appliance\fR).
.TP
\fI/run/llm\-appliance/control.sock\fR
The control socket of \fBllm\-appliance ctl\fR; members of the group llm\-appliance may use it.
.TP
\fI/var/log/llm\-appliance/requests.log\fR
One JSON line per request; rotated by \fI/etc/logrotate.d/llm\-appliance\fR (SIGUSR1 reopens it).
.TP
\fI/var/cache/llm\-appliance/\fR
Models fetched by \fBllm\-appliance model fetch\fR, Triton and CUDA kernel caches.
.TP
\fI/usr/share/llm\-appliance/models/SmolLM2\-135M\-Instruct/\fR
The default model from the package llm\-appliance\-model\-smollm2, used by \fBmodel = "default"\fR when the cache has no copy.
.TP
\fI/opt/llm\-appliance/\fR, \fI/opt/llm\-appliance\-runtime/\fR
The application's Python environment and the torch runtime (package llm\-appliance\-runtime\-cpu or \-cuda).
.SH ENVIRONMENT
.TP
\fBLLM_APPLIANCE_CACHE\fR
The cache directory (default \fI~/.cache/llm\-appliance\fR; the unit sets \fI/var/cache/llm\-appliance\fR).
.TP
\fBLLM_APPLIANCE_CONTROL_SOCKET\fR
The control socket \fBllm\-appliance ctl\fR talks to.
.TP
\fBCREDENTIALS_DIRECTORY\fR
Set by systemd for LoadCredential=; a bare \fBapi_key_file\fR name is looked up there.
.SH SIGNALS
\fBSIGTERM\fR drains (new requests get 503, running ones finish within server.drain_timeout_s) and exits 0;
\fBSIGHUP\fR re\-reads the config (client keys, quotas, log level);
\fBSIGUSR1\fR reopens the request log.
.SH EXIT STATUS
0 on success; 78 (EX_CONFIG) for a bad config file (systemd does not restart it); 2 for a usage error;
1 for other failures.
.SH EXAMPLES
.nf
sudo apt install ./llm\-appliance_*.deb ./llm\-appliance\-runtime\-cpu_*.deb ./llm\-appliance\-model\-smollm2_*.deb
sudoedit /etc/llm\-appliance/appliance.toml
llm\-appliance config check /etc/llm\-appliance/appliance.toml
sudo systemctl enable \-\-now llm\-appliance
curl http://127.0.0.1:8000/health
llm\-appliance ctl status
.fi
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBlogrotate\fR(8), \fBsystemd.exec\fR(5),
\fI/usr/share/doc/llm\-appliance/README.md\fR
"""


def main(argv: list[str]) -> int:
    version = argv[1] if len(argv) > 1 else "unknown"
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    date = datetime.datetime.fromtimestamp(epoch, datetime.UTC) if epoch else datetime.datetime.now(datetime.UTC)
    out = [
        f'.TH LLM\\-APPLIANCE 1 "{date:%Y-%m-%d}" "llm-appliance {esc(version)}" "llm-appliance manual"',
        ".SH NAME", "llm\\-appliance \\- self\\-hosted LLM serving appliance (OpenAI\\-compatible API)",
        ".SH SYNOPSIS", "\\fBllm\\-appliance\\fR \\fICOMMAND\\fR [\\fIoptions\\fR]",
        ".br", "\\fBllm\\-appliance\\fR \\fB\\-\\-version\\fR",
        ".SH DESCRIPTION",
        "One daemon, \\fBllm\\-appliance serve\\fR, runs a paged\\-KV continuous\\-batching engine behind an "
        "OpenAI\\-compatible HTTP API; systemd runs it as the service \\fBllm\\-appliance\\fR. The other "
        "commands check its configuration, talk to it over its control socket, manage the default model "
        "and run offline generation and benchmarks.",
        ".SH COMMANDS",
    ]
    for name, (_module, summary) in cli._SUBCOMMANDS.items():  # noqa: SLF001
        if not summary:
            raise SystemExit(f"gen_manpage: `llm-appliance {name}` has no help text")
        if name == "bench":
            # Each suite of `bench` is its own module with its own options (cli.main routes
            # `bench SUITE` there): one subsection per suite, or `bench serve` would go unlisted.
            for suite, module_name in cli._BENCH_SUITES.items():  # noqa: SLF001
                out += command_section(name, summary, module_name, f"llm-appliance bench {suite}")
            continue
        out += command_section(name, summary)
    sys.stdout.write("\n".join(out) + STATIC_TAIL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
