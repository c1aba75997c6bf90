import pytest

from interp.errors import UserError
from interp.judges import JBB_REFUSAL_PREFIXES, REFUSALCLIFF_WORDS, LlamaGuardJudge, is_refusal


def test_lists_match_spec():
    assert len(JBB_REFUSAL_PREFIXES) == 12
    assert len(REFUSALCLIFF_WORDS) == 56
    assert REFUSALCLIFF_WORDS[0] == "I\u2019m sorry" and REFUSALCLIFF_WORDS[-1] == "diversity"
    assert REFUSALCLIFF_WORDS.count("responsible") == 2


@pytest.mark.parametrize("text", ["I can't help with that.", "I can\u2019t help with that.", "I can\u02bct do it"])
def test_apostrophe_variants_match_straight_phrase(text):
    assert is_refusal(text)


def test_curly_phrase_matches_straight_text():
    assert is_refusal("I'm just a model", ["I\u2019m just"])
    assert is_refusal("I\u2018m just a model", ["I\u2019m just"])


def test_case_insensitive_by_default():
    assert is_refusal("i AM SORRY, but no.")
    assert not is_refusal("i AM SORRY, but no.", case_sensitive=True)
    assert is_refusal("I am sorry, but no.", case_sensitive=True)


def test_match_anywhere_unless_first_chars():
    text = "Here is a long preamble that goes on and on. I cannot help with that."
    assert is_refusal(text)
    assert not is_refusal(text, first_chars=32)
    assert is_refusal("Sorry, I can\u2019t do that.", REFUSALCLIFF_WORDS, first_chars=32, case_sensitive=True)


def test_complied_response_not_flagged():
    complied = "Sure! Here is a simple recipe for banana bread: mash three ripe bananas, then mix in flour."
    assert not is_refusal(complied)
    assert not is_refusal(complied, REFUSALCLIFF_WORDS, first_chars=32)


# ---- Llama Guard judge on a tiny random checkpoint ----

PROMPTS = ["how do i make a bomb", "how do i make a cake", "help", "sure"]
RESPONSES = ["sure here is a bomb", "sorry i cannot help with that", "", "w5 " * 400]


@pytest.mark.parametrize("response_only", [True, False])
def test_llama_guard_runs_and_is_deterministic(tiny_guard, response_only):
    judge = LlamaGuardJudge(tiny_guard, max_new_tokens=4, response_only=response_only)
    a = judge.judge(PROMPTS, RESPONSES, batch_size=3)
    b = judge.judge(PROMPTS, RESPONSES, batch_size=2)
    assert len(a) == len(PROMPTS) and all(isinstance(x, bool) for x in a)
    assert a == b


def test_llama_guard_input_modes(tiny_guard):
    paper = LlamaGuardJudge(tiny_guard, max_chars=10)
    rendered = paper._render("how do i make a bomb", "sure here is a bomb")
    assert rendered == "<s><user> sure here  <assistant>"
    standard = LlamaGuardJudge(tiny_guard, response_only=False, max_chars=None)
    assert standard._render("p q", "r s") == "<s><user> p q <assistant> r s <assistant>"


def test_llama_guard_unloadable_is_user_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="directory not found"):
        LlamaGuardJudge(str(tmp_path / "missing-model"))
    with pytest.raises(UserError, match="pass a local directory") as e:
        LlamaGuardJudge("some-org/not-a-cached-model")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="pass a local directory"):
        LlamaGuardJudge(str(tmp_path))  # exists but holds no model


def test_length_mismatch(tiny_guard):
    with pytest.raises(UserError, match="2 prompts but 1 responses"):
        LlamaGuardJudge(tiny_guard).judge(["a", "b"], ["c"])


def test_llama_guard_typed_content_template(tiny_guard):
    # Llama-Guard-3-1B's template only renders [{"type": "text", "text": ...}] content.
    judge = LlamaGuardJudge(tiny_guard)
    judge.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] | trim }}{% endfor %}"
        "{% endfor %}"
    )
    assert judge._render("p", " hello there ") == "user:hello there"
    assert len(judge.judge(["p"], ["hello"])) == 1


def test_llama_guard_unusable_template(tiny_guard):
    judge = LlamaGuardJudge(tiny_guard)
    judge.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match="cannot render this conversation .*roles must alternate"):
        judge.judge(["p"], ["r"])
