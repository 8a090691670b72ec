"""Chat templates render exactly as transformers' apply_chat_template(..., tokenize=False), on
templates written as the Llama-3, ChatML/Qwen, Gemma and Mistral releases write theirs."""

import json

import pytest
from test_tokenizers_hf import bpe_release, ours

from vlm_jax.data.chat_template import ChatTemplateError, render_chat

LLAMA3 = (
    "{{- bos_token }}{% for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CHATML = """{% for message in messages %}
{% if loop.first and messages[0]['role'] != 'system' %}
{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}"""
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('roles must alternate user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- set ns.turns = ns.turns + 1 %}
        {%- if loop.last and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
{#- tools as JSON, non-ASCII kept #}
{%- if tools %}{{ '[TOOLS]' + tools | tojson + '[/TOOLS]' }}{% endif %}"""
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "gemma": GEMMA, "mistral": MISTRAL}

SYSTEM = {"role": "system", "content": "Be brief. <b>Caf\u00e9</b> \u65e5\u672c"}
CHATS = {
    "one_turn": [{"role": "user", "content": "What is in the picture? <image>"}],
    "multi_turn": [
        {"role": "user", "content": "  Hi there  "},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nabout cats."},
    ],
    "system": [SYSTEM, {"role": "user", "content": "Hi"}],
    "system_multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey.", "tool_calls": None},
        {"role": "user", "content": "Bye"},
    ],
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """A release directory per template (in tokenizer_config.json), and transformers' tokenizer."""
    from transformers import AutoTokenizer

    out = {}
    for name, template in TEMPLATES.items():
        directory = bpe_release(tmp_path_factory.mktemp(name) / "release")
        config = json.loads((directory / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = (ours(directory, ()), AutoTokenizer.from_pretrained(str(directory)))
    return out


def render(tok, chat, **options):
    return render_chat(tok.chat_template, chat, **tok.template_tokens, **options)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_rendered_string_equals_apply_chat_template(
    releases, template, chat, add_generation_prompt
):
    tok, ref = releases[template]
    messages = CHATS[chat]
    try:
        expected = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # the template refuses (Gemma: no system role)
        with pytest.raises(ChatTemplateError, match="refused the chat: " + str(error)):
            render(tok, messages, add_generation_prompt=add_generation_prompt)
        assert template == "gemma" and chat.startswith("system")
        return
    assert render(tok, messages, add_generation_prompt=add_generation_prompt) == expected
    ids = ref.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.encode(expected) == list(ids)


def test_tools_render_through_tojson_keeping_non_ascii(releases):
    tok, ref = releases["mistral"]
    tools = [{"name": "caf\u00e9", "description": "<b>&</b>", "parameters": {}}]
    chat = CHATS["one_turn"]
    expected = ref.apply_chat_template(chat, tools=tools, tokenize=False)
    assert render(tok, chat, tools=tools) == expected and "caf\u00e9" in expected


def test_sandbox_and_missing_templates_fail_clearly(tmp_path):
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        render_chat(None, CHATS["one_turn"])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", CHATS["one_turn"])
    escape = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception, match="unsafe|__class__"):
        render_chat(escape, CHATS["one_turn"])
    tok = ours(bpe_release(tmp_path / "bpe"))  # a template file wins over tokenizer_config's
    (tmp_path / "bpe" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert render(ours(tmp_path / "bpe"), CHATS["one_turn"]).endswith("<image>!")
    assert tok.chat_template is None
