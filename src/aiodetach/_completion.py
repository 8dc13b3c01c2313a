"""``aiodetach completion bash|zsh``: shell completion scripts.

Generated from the command's own argparse parser each time they are printed,
so they cannot drift from the options: a new option completes once it is in
the parser.  Domain names complete from ``virsh --readonly list --all
--name`` on the URI named on the line (``--uri`` / ``-c`` / ``--connect``,
else ``$LIBVIRT_DEFAULT_URI``, else ``qemu:///system``) when virsh is
installed, within 2 s (``timeout``), read-only; without virsh they are not
offered.  Starting a Python and connecting on each Tab would cost ~0.3 s a
press: virsh is a C program, already on a libvirt host.

The parser is walked through argparse's ``_actions`` / ``choices``:
undocumented, but stable since Python 3.2, and what every argparse
completion generator reads.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

__all__ = ["add_completion_command", "script"]

SHELLS = ("bash", "zsh")
URI_OPTIONS = ("--uri", "-c", "--connect")
FILE_DESTS = ("file", "xml_file", "journal")


def add_completion_command(sub: argparse._SubParsersAction[Any]) -> None:
    """The ``completion`` subcommand, on the parser's subcommands."""
    completion = sub.add_parser(
        "completion",
        help='print a shell completion script: eval "$(aiodetach completion bash)"',
        description="Print a completion script for bash or zsh (subcommands, options, "
        "and domain names from `virsh --readonly list --all --name` when virsh is installed).",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")


@dataclass
class _Option:
    strings: list[str]
    help: str
    takes_value: bool
    choices: list[str] | None
    kind: str  # "uri", "file" or "" (a value with nothing to offer)


@dataclass
class _Command:
    name: str
    help: str
    options: list[_Option] = field(default_factory=list)
    positionals: list[tuple[str, list[str] | None]] = field(default_factory=list)
    """(kind, choices): kind "domain", "file", "choice" or "" per positional."""


def _options(parser: argparse.ArgumentParser) -> list[_Option]:
    out: list[_Option] = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        takes_value = action.nargs != 0
        kind = ""
        if set(action.option_strings) & set(URI_OPTIONS):
            kind = "uri"
        elif action.dest in FILE_DESTS:
            kind = "file"
        choices = [str(c) for c in action.choices] if action.choices else None
        out.append(
            _Option(list(action.option_strings), action.help or "", takes_value, choices, kind)
        )
    return out


def _positionals(parser: argparse.ArgumentParser) -> list[tuple[str, list[str] | None]]:
    out: list[tuple[str, list[str] | None]] = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        if action.choices:
            out.append(("choice", [str(c) for c in action.choices]))
        elif action.dest == "domain":
            out.append(("domain", None))
        elif action.dest in FILE_DESTS:
            out.append(("file", None))
        else:
            out.append(("", None))
    return out


def _model(parser: argparse.ArgumentParser) -> tuple[_Command, list[_Command]]:
    top = _Command("", parser.description or "", _options(parser))
    commands: list[_Command] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            commands.append(_Command(name, helps.get(name, ""), _options(sub), _positionals(sub)))
    return top, commands


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` of the command ``parser`` parses."""
    top, commands = _model(parser)
    return (
        _bash(parser.prog, top, commands) if shell == "bash" else _zsh(parser.prog, top, commands)
    )


# -- bash -----------------------------------------------------------------------------

_BASH_DOMAINS = r"""
__PROG___domains() {
    command -v virsh >/dev/null 2>&1 || return 0
    local uri=${1:-${LIBVIRT_DEFAULT_URI:-qemu:///system}}
    timeout 2 virsh --readonly -c "$uri" list --all --name 2>/dev/null
}
"""

_BASH_MAIN = r"""
__PROG__() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd="" uri="" w i skip=0 npos=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if ((skip)); then skip=0; continue; fi
        case " $(__PROG___valued "$cmd") " in
            *" $w "*)
                skip=1
                case " __URI__ " in *" $w "*) uri=${COMP_WORDS[i+1]} ;; esac
                continue ;;
        esac
        case $w in
            --*=*) case " __URI__ " in *" ${w%%=*} "*) uri=${w#*=} ;; esac ;;
            -*) ;;
            *) if [[ -z $cmd ]]; then cmd=$w; else npos=$((npos + 1)); fi ;;
        esac
    done
    COMPREPLY=()
    if [[ $cur != -* || $cur == *=* ]] && [[ " $(__PROG___valued "$cmd") " == *" $prev "* ]]; then
        case " __URI__ " in
            *" $prev "*) COMPREPLY=($(compgen -W "qemu:///system qemu:///session" -- "$cur")) ;;
            *) case " $(__PROG___files "$cmd") " in
                   *" $prev "*) COMPREPLY=($(compgen -f -- "$cur")) ;;
                   *) COMPREPLY=($(compgen -W "$(__PROG___choices "$cmd" "$prev")" -- "$cur")) ;;
               esac ;;
        esac
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$(__PROG___opts "$cmd")" -- "$cur"))
        return 0
    fi
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "__COMMANDS__" -- "$cur"))
        return 0
    fi
    local kind
    kind=$(__PROG___positional "$cmd" "$npos")
    case $kind in
        domain) COMPREPLY=($(compgen -W "$(__PROG___domains "$uri")" -- "$cur")) ;;
        file) COMPREPLY=($(compgen -f -- "$cur")) ;;
        choice:*) COMPREPLY=($(compgen -W "${kind#choice:}" -- "$cur")) ;;
    esac
    return 0
}
complete -o default -F __PROG__ __NAME__
"""


def _bash_case(fn: str, args: str, rows: list[tuple[str, str]]) -> str:
    body = "".join(
        f"        {_bash_quote(key)}) echo {_bash_quote(value)} ;;\n" for key, value in rows
    )
    return f"{fn}() {{\n    case {args} in\n{body}    esac\n}}\n"


def _bash_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _bash(prog: str, top: _Command, commands: list[_Command]) -> str:
    fn = "_" + prog.replace("-", "_")
    every = [top, *commands]
    opts = [(c.name, " ".join(s for o in c.options for s in o.strings)) for c in every]
    valued = [
        (c.name, " ".join(s for o in c.options if o.takes_value for s in o.strings)) for c in every
    ]
    files = [
        (c.name, " ".join(s for o in c.options if o.kind == "file" for s in o.strings))
        for c in every
    ]
    choices = [
        (f"{c.name} {s}", " ".join(o.choices))
        for c in every
        for o in c.options
        if o.choices
        for s in o.strings
    ]
    positional = []
    for c in commands:
        for n, (kind, words) in enumerate(c.positionals):
            positional.append((f"{c.name} {n}", f"choice:{' '.join(words)}" if words else kind))
    parts = [
        f"# {prog} completion for bash: generated by `{prog} completion bash` from its options.\n"
        f'# Load it with: eval "$({prog} completion bash)"   (or save it in\n'
        f"# ~/.local/share/bash-completion/completions/{prog})\n",
        _bash_case(f"{fn}_opts", '"$1"', opts),
        _bash_case(f"{fn}_valued", '"$1"', valued),
        _bash_case(f"{fn}_files", '"$1"', files),
        _bash_case(f"{fn}_choices", '"$1 $2"', choices),
        _bash_case(f"{fn}_positional", '"$1 $2"', positional),
        _BASH_DOMAINS.replace("__PROG__", fn),
        _BASH_MAIN.replace("__PROG__", fn)
        .replace("__NAME__", prog)
        .replace("__URI__", " ".join(URI_OPTIONS))
        .replace("__COMMANDS__", " ".join(c.name for c in commands)),
    ]
    return "\n".join(parts)


# -- zsh ------------------------------------------------------------------------------


def _zsh_escape(text: str) -> str:
    """Text inside a single-quoted ``_arguments`` spec: no quote, no bracket, no colon."""
    text = " ".join(text.split())
    for char in "\\[]:":
        text = text.replace(char, "\\" + char)
    return text.replace("'", "'\\''")


def _zsh_option(o: _Option, fn: str) -> list[str]:
    action = ""
    if o.takes_value:
        if o.kind == "file":
            action = ":path:_files"
        elif o.kind == "uri":
            action = ":uri:(qemu\\:///system qemu\\:///session)"
        elif o.choices:
            action = f":value:({' '.join(o.choices)})"
        else:
            action = ":value: "
    exclusive = f"({' '.join(o.strings)})" if len(o.strings) > 1 else ""
    return [f"'{exclusive}{s}[{_zsh_escape(o.help)}]{action}'" for s in o.strings]


def _zsh_positional(n: int, kind: str, words: list[str] | None, fn: str) -> str:
    if words:
        return f"'{n + 1}:value:({' '.join(words)})'"
    if kind == "domain":
        return f"'{n + 1}:domain:{fn}_domains'"
    if kind == "file":
        return f"'{n + 1}:file:_files'"
    return f"'{n + 1}:value: '"


def _zsh(prog: str, top: _Command, commands: list[_Command]) -> str:
    fn = "_" + prog.replace("-", "_")
    lines = [
        f"#compdef {prog}",
        f"# {prog} completion for zsh: generated by `{prog} completion zsh` from its options.",
        f'# Load it with: eval "$({prog} completion zsh)"   (or save it as _{prog}',
        "# in a directory of $fpath)",
        "",
        f"{fn}_domains() {{",
        "    (( $+commands[virsh] )) || return 1",
        "    local uri=${LIBVIRT_DEFAULT_URI:-qemu:///system}",
        "    local key",
        "    for key in --uri -c --connect; do",
        "        [[ -n ${opt_args[$key]} ]] && uri=${opt_args[$key]}",
        "    done",
        "    local -a domains",
        "    local names",
        '    names="$(timeout 2 virsh --readonly -c "$uri" list --all --name 2>/dev/null)"',
        "    domains=(${(f)names})",
        "    domains=(${domains:#})",
        "    _describe -t domains domain domains",
        "}",
        "",
        f"{fn}() {{",
        "    local curcontext=$curcontext state line",
        "    typeset -A opt_args",
        "    _arguments -C \\",
    ]
    for o in top.options:
        lines.extend(f"        {spec} \\" for spec in _zsh_option(o, fn))
    lines += [
        "        '1: :->command' \\",
        "        '*:: :->args'",
        "    case $state in",
        "    command)",
    ]
    lines.append("        local -a commands")
    lines.append("        commands=(")
    for c in commands:
        lines.append(f"            '{c.name}:{_zsh_escape(c.help)}'")
    lines += [
        "        )",
        "        _describe -t commands command commands",
        "        ;;",
        "    args)",
    ]
    lines.append("        case $line[1] in")
    for c in commands:
        lines.append(f"        {c.name})")
        specs = [spec for o in c.options for spec in _zsh_option(o, fn)]
        specs += [_zsh_positional(n, k, w, fn) for n, (k, w) in enumerate(c.positionals)]
        lines.append("            _arguments \\")
        lines.extend(f"                {spec} \\" for spec in specs[:-1])
        lines.append(f"                {specs[-1]}" if specs else "                ''")
        lines.append("            ;;")
    lines += ["        esac", "        ;;", "    esac", "}", ""]
    # Autoloaded from $fpath, the file is the function's body; eval'ed, it registers.
    lines += [
        "if [[ $zsh_eval_context[-1] == loadautofunc ]]; then",
        f'    {fn} "$@"',
        "else",
        f"    compdef {fn} {prog}",
        "fi",
        "",
    ]
    return "\n".join(lines)
