"""The text measures the verifier's rules check: the output language, sentences and bullets."""

import pytest

from kolm_ray.measures import bullet_count, content_words, detect_language, sentence_count


@pytest.mark.parametrize(
    "text, language",
    [
        ("The city council approved the new budget for the transit system, and the work will start in March.", "en"),
        ("El ayuntamiento aprobó el nuevo presupuesto para el sistema de transporte, y las obras empezarán en marzo.", "es"),
        ("Le conseil municipal a approuvé le nouveau budget pour le réseau de transport, et les travaux commenceront.", "fr"),
        ("Der Stadtrat hat das neue Budget für das Verkehrssystem genehmigt, und die Arbeiten beginnen im März.", "de"),
        ("Il consiglio comunale ha approvato il nuovo bilancio per il sistema dei trasporti, e i lavori inizieranno.", "it"),
        ("A câmara municipal aprovou o novo orçamento para o sistema de transportes, e as obras começam em março.", "pt"),
        ("De gemeenteraad heeft het nieuwe budget voor het vervoerssysteem goedgekeurd, en de werken beginnen.", "nl"),
    ],
)
def test_detect_language_names_the_seven_profiled_languages(text, language):
    assert detect_language(text) == language


@pytest.mark.parametrize("text", ["billing", "OK", "Acme Corp 2024", "東京は日本の首都です。"])
def test_detect_language_is_unsure_on_short_or_unprofiled_text(text):
    assert detect_language(text) is None


@pytest.mark.parametrize(
    "text, n",
    [("One sentence.", 1), ("Two sentences. Here is another!", 2),
     ("Dr. Smith went to the U.S. Army base. He left.", 2), ("e.g. this is one sentence.", 1),
     ("Line one\nLine two", 2), ("The rate is 3.5 percent. Done", 2)],
)
def test_sentence_count(text, n):
    assert sentence_count(text) == n


def test_bullet_count_counts_every_bullet_style():
    assert bullet_count("- a\n- b\n* c\n1. d\n\u2022 e\nnot a bullet") == 5


def test_long_texts_are_not_kept_in_the_content_words_cache():
    """A serving host scores whatever its callers send: its cache must not hold their megabytes."""
    from kolm_ray.measures import _CACHED_TEXT_CHARS, _content_words_cached

    _content_words_cached.cache_clear()
    long = "alpha beta gamma " * (_CACHED_TEXT_CHARS // 8)
    assert content_words(long) == content_words(long) == frozenset({"alpha", "beta", "gamma"})
    assert _content_words_cached.cache_info().currsize == 0
    assert content_words("alpha beta") == frozenset({"alpha", "beta"})
    assert _content_words_cached.cache_info().currsize == 1
