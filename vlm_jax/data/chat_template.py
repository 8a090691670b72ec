"""Chat templates: a release's Jinja `chat_template` rendered as transformers'
`apply_chat_template(..., tokenize=False)` renders it.

    text = render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                       **tokenizer.template_tokens)        # bos_token, eos_token, ...
    ids = tokenizer.encode(text)                           # the template writes BOS itself

Templates are untrusted code from a model hub, so they run in Jinja's immutable sandbox, with
the environment transformers gives them: trim_blocks and lstrip_blocks, the loopcontrols
extension, `raise_exception(message)`, `strftime_now(format)`, a `tojson` that keeps non-ASCII
text and HTML characters as they are, and `dict`/`namespace` that cannot reach Python internals.
The `{% generation %}` block (assistant-token masks) renders its body.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_jax.config import UserError, require_package

NEEDED_BY = "a chat template (tokenizer.chat_template, --chat)"


class ChatTemplateError(UserError, ValueError):
    """The template raised (`raise_exception`) or failed to render (a CLI exits 2 on it)."""


def _raise_exception(message: str):
    jinja2 = require_package("jinja2", NEEDED_BY, "pip install jinja2")
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type object itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.cache
def _environment():
    """The sandboxed Jinja environment (built once: jinja2 is imported only for chat)."""
    jinja2 = require_package("jinja2", NEEDED_BY, "pip install jinja2")
    from jinja2 import ext, nodes, sandbox

    class Generation(ext.Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body."""

        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace: {name!r}"
                )

    env = sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_Dict(),
        namespace=Namespace,
    )
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Jinja source -> a compiled template (cached: a run renders one template many times)."""
    jinja2 = require_package("jinja2", NEEDED_BY, "pip install jinja2")
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatTemplateError(f"the chat template does not parse: {error}") from None


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """`messages` ([{"role": ..., "content": ...}]) as the template writes them; `variables`
    (bos_token, eos_token, ...: `Tokenizer.template_tokens`, and any the template reads)."""
    if template is None:
        raise ChatTemplateError(
            "the tokenizer has no chat template: a release's tokenizer_config.json "
            "(chat_template) or chat_template.jinja provides one"
        )
    if not messages:
        raise ChatTemplateError("a chat needs at least one message")
    # transformers drops keys whose value is None (templates test for presence)
    messages = [{k: v for k, v in dict(message).items() if v is not None} for message in messages]
    jinja2 = require_package("jinja2", NEEDED_BY, "pip install jinja2")
    try:
        return compile_template(template).render(
            messages=messages,
            tools=None if tools is None else list(tools),
            documents=None if documents is None else list(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.TemplateError as error:
        raise ChatTemplateError(f"the chat template refused the chat: {error}") from None
