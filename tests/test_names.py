import pytest

from modelfs.cache.errors import InvalidName
from modelfs.fetcher.names import ModelName, Registry, parse_name


@pytest.mark.parametrize("text, want", [
    ("qwen3", ("registry.ollama.ai", "library", "qwen3", "latest", "https")),
    ("qwen3:0.6b", ("registry.ollama.ai", "library", "qwen3", "0.6b", "https")),
    ("alice/tiny", ("registry.ollama.ai", "alice", "tiny", "latest", "https")),
    ("example.com/alice/tiny:q4_0", ("example.com", "alice", "tiny", "q4_0", "https")),
    ("example.com:5000/alice/tiny:v1", ("example.com:5000", "alice", "tiny", "v1", "https")),
    ("http://example.com/alice/tiny", ("example.com", "alice", "tiny", "latest", "http")),
    ("Mixed_Case/Model.v2:Tag-1", ("registry.ollama.ai", "Mixed_Case", "Model.v2", "Tag-1",
                                    "https")),
])
def test_parse_valid_names(text, want):
    n = parse_name(text)
    assert (n.host, n.namespace, n.model, n.tag, n.scheme) == want


@pytest.mark.parametrize("text", [
    "", "..", "a/../../etc", "../x", "./x", "a/./b", "/abs", "a//b", "model:", ":tag", "ns/",
    "a/b/c/d", "sp ace", "tab\tname", "nl\nname", "nul\0x", "dot.ns/model", "host:1/model",
    "-lead", ".hidden", "ftp://host/ns/model", "m" * 81, "a:" + "t" * 81, "x" * 10_000,
    "modèle", "a@sha256:" + "0" * 64,
])
def test_parse_invalid_names(text):
    with pytest.raises(InvalidName):
        parse_name(text)


def test_registry_says_where_from_not_what_a_name_is():
    reg = Registry.from_url("http://127.0.0.1:8080")
    n = parse_name("tiny", reg)
    # fetched from the registry, called and stored as Ollama calls it
    assert (n.base_url, n.store_parts) == ("http://127.0.0.1:8080",
                                           ("registry.ollama.ai", "library", "tiny", "latest"))
    assert str(n) == "registry.ollama.ai/library/tiny:latest" and n.short() == "tiny:latest"
    # the same model served from another port, or from the public registry, is the same model
    other = parse_name("tiny", Registry.from_url("http://127.0.0.1:9090"))
    assert other == n == parse_name("tiny") and len({n, other}) == 1
    assert other.base_url == "http://127.0.0.1:9090"
    assert parse_name("tiny").base_url == "https://registry.ollama.ai"
    # a name with its own host keeps it, and is fetched from it
    assert parse_name("example.com/a/b", reg).base_url == "https://example.com"
    assert parse_name("http://example.com/a/b", reg).base_url == "http://example.com"
    # the registry's own address typed as a host is a host of its own, reached as configured
    own = parse_name("127.0.0.1:8080/alice/tiny", reg)
    assert own.store_parts == ("127.0.0.1:8080", "alice", "tiny", "latest") and own != \
        parse_name("alice/tiny", reg)
    assert own.base_url == "http://127.0.0.1:8080"
    assert reg.name("registry.ollama.ai", "library", "tiny", "latest") == n


@pytest.mark.parametrize("url", ["ftp://x", "http://h/path", "http://u:p@h", "http://bad host"])
def test_registry_url_refused(url):
    with pytest.raises(InvalidName):
        Registry.from_url(url)


def test_short_form_round_trips():
    for text in ("tiny:latest", "alice/tiny:v1", "example.com/alice/tiny:v1"):
        assert parse_name(parse_name(text).short()) == parse_name(text)
    with pytest.raises(InvalidName):
        ModelName("h", "..", "m", "t")
