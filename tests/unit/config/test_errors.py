"""Each class of error gives a ConfigIssue with the right path, line and message."""

from __future__ import annotations

import pytest

from dispa.config import check_file, load_config, load_config_text
from dispa.errors import ConfigError

TARGETS = '''
[[targets.targets]]
name = "a"
url = "http://10.0.0.1:80"
'''

# (toml text, expected path, expected line, fragment of the message)
CASES = [
    pytest.param('[server]\nworkers = 0\n' + TARGETS, "server.workers", 2, ">= 1",
                 id="workers-min"),
    pytest.param('[server]\nworkers = "many"\n' + TARGETS, "server.workers", 2, "many",
                 id="workers-type"),
    pytest.param('[server]\nbind_address = "0.0.0.0"\n' + TARGETS, "server.bind_address", 2,
                 "host:port", id="bind-no-port"),
    pytest.param('[server]\nbind_address = "::1:80"\n' + TARGETS, "server.bind_address", 2,
                 "brackets", id="bind-v6-no-brackets"),
    pytest.param('[server]\nbind_address = "h:99999"\n' + TARGETS, "server.bind_address", 2,
                 "65535", id="bind-port-range"),
    pytest.param('[server]\nkeep_alive_timeout = -1\n' + TARGETS,
                 "server.keep_alive_timeout", 2, "> 0", id="negative-timeout"),
    pytest.param('[server]\ntrusted_proxies = ["10.0.0.0/8",\n  "bogus"]\n' + TARGETS,
                 "server.trusted_proxies[1]", 3, "CIDR", id="trusted-proxy"),
    pytest.param('[server]\nvia = "my proxy"\n' + TARGETS, "server.via", 2, "token", id="via"),
    pytest.param('[server]\nrequest_id_header = "x id"\n' + TARGETS,
                 "server.request_id_header", 2, "header name", id="request-id-header"),
    pytest.param('[server]\nmax_line_bytes = 100000\n' + TARGETS, "server.max_line_bytes", 2,
                 "max_head_bytes", id="line-vs-head"),
    pytest.param('[server]\nbind_adress = "0.0.0.0:80"\n' + TARGETS, "server.bind_adress", 2,
                 "did you mean 'bind_address'?", id="unknown-key"),
    pytest.param('[severs]\nx = 1\n' + TARGETS, "severs", 1, "did you mean 'server'?",
                 id="unknown-section"),
    pytest.param('[domains]\nintercept_domains = ["ok.com", "bad_host!"]\n' + TARGETS,
                 "domains.intercept_domains[1]", 2, "not a valid host name", id="bad-domain"),
    pytest.param('[domains]\nexclude_domains = ["a.*.com"]\n' + TARGETS,
                 "domains.exclude_domains[0]", 2, "leading", id="mid-wildcard"),
    pytest.param('[domains]\nintercept_domains = ["*"]\n' + TARGETS,
                 "domains.intercept_domains[0]", 2, "empty intercept_domains", id="star"),
    pytest.param('[domains]\nwildcard_support = false\nintercept_domains = ["*.a.com"]\n'
                 + TARGETS, "domains.intercept_domains[0]", 3, "wildcard_support is false",
                 id="wildcard-off"),
    pytest.param('[domains]\nreject_status = 99\n' + TARGETS, "domains.reject_status", 2,
                 ">= 200", id="reject-status"),
    pytest.param('[targets]\nmax_retries = -1\n' + TARGETS, "targets.max_retries", 2, ">= 0",
                 id="retries"),
    pytest.param('[[targets.targets]]\nname = "a"\nurl = "https://x:443/p"\n',
                 "targets.targets[0].url", 3, "may not have a path", id="https"),
    pytest.param('[[targets.targets]]\nname = "a"\nurl = "ftp://x"\n',
                 "targets.targets[0].url", 3, "scheme", id="ftp"),
    pytest.param('[[targets.targets]]\nname = "a"\nurl = "http://x/api"\n',
                 "targets.targets[0].url", 3, "path", id="url-path"),
    pytest.param('[[targets.targets]]\nname = "a"\nurl = "http://x:notaport"\n',
                 "targets.targets[0].url", 3, "invalid URL", id="url-port"),
    pytest.param('[[targets.targets]]\nname = "a"\n', "targets.targets[0].url", 1,
                 "missing required key 'url'", id="missing-url"),
    pytest.param('[[targets.targets]]\nname = "a"\nurl = "http://x"\nweight = 0\n',
                 "targets.targets[0].weight", 4, ">= 1", id="weight"),
    pytest.param(TARGETS + '[[targets.targets]]\nname = "a"\nurl = "http://10.0.0.2"\n',
                 "targets.targets[1].name", 6, "duplicate name 'a'", id="dup-name"),
    pytest.param(TARGETS + '[[targets.targets]]\nname = "b"\nurl = "http://10.0.0.1/"\n',
                 "targets.targets[1].url", 7, "duplicate endpoint 10.0.0.1:80", id="dup-endpoint"),
    pytest.param('[targets]\n', "targets.targets", 1, "at least one upstream", id="no-targets"),
    pytest.param('[targets.load_balancing]\ntype = "fastest"\n' + TARGETS,
                 "targets.load_balancing.type", 2, "roundrobin", id="lb-type"),
    pytest.param('[targets.load_balancing]\ntype = "random"\nstiky = true\n' + TARGETS,
                 "targets.load_balancing.stiky", 3, "did you mean 'sticky_sessions'?",
                 id="lb-unknown-key"),
    pytest.param('[targets.health_check]\ninterval = 5\ntimeout = 6\n' + TARGETS,
                 "targets.health_check.timeout", 3, "longer than interval", id="hc-timeout"),
    pytest.param('[targets.health_check]\nexpected_status = [200, 700]\n' + TARGETS,
                 "targets.health_check.expected_status[1]", 2, "<= 599", id="hc-status"),
    pytest.param('[targets.health_check]\npath = "health"\n' + TARGETS,
                 "targets.health_check.path", 2, "start with", id="hc-path"),
    pytest.param('[targets.pool]\nmax_idle = 10\nmax_total = 5\n' + TARGETS,
                 "targets.pool.max_idle", 2, "max_total", id="pool"),
    pytest.param('[logging]\ntype = "syslog"\n' + TARGETS, "logging.type", 2, "file, database",
                 id="log-type"),
    pytest.param('[logging]\nlevel = "verbose"\n' + TARGETS, "logging.level", 2, "debug",
                 id="log-level"),
    pytest.param('[logging]\nformat = "jsn"\n' + TARGETS, "logging.format", 2,
                 "did you mean 'json'?", id="log-format"),
    pytest.param('[logging.database]\nurl = "mysql://u:pw@h/db"\n' + TARGETS,
                 "logging.database.url", 2, "mysql://u:***@h/db", id="db-url-masked"),
    pytest.param('[logging]\nretention_days = -3\n' + TARGETS, "logging.retention_days", 2,
                 ">= 0", id="retention"),
    pytest.param('[monitoring]\nmetrics_port = 70000\n' + TARGETS, "monitoring.metrics_port", 2,
                 "<= 65535", id="port-range"),
    pytest.param('[server]\nbind_address = "0.0.0.0:9090"\n' + TARGETS,
                 "monitoring.metrics_port", None, "also the proxy's port", id="port-clash"),
    pytest.param('[monitoring]\nbind_host = "not a host"\n' + TARGETS, "monitoring.bind_host", 2,
                 "bind_host", id="bind-host"),
    pytest.param('[server]\nworkers = true\n' + TARGETS, "server.workers", 2, "got True",
                 id="bool-is-not-int"),
    pytest.param('server = 3\n' + TARGETS, "server", 1, "expected a table", id="not-a-table"),
    pytest.param('[domains]\nintercept_domains = "a.com"\n' + TARGETS,
                 "domains.intercept_domains", 2, "expected an array", id="not-an-array"),
    pytest.param('[server]\nvia = ["a"]\n' + TARGETS, "server.via", 2, "expected a string",
                 id="array-for-string"),
]


@pytest.mark.parametrize("text, path, line, fragment", CASES)
def test_each_error_class_is_located(text, path, line, fragment, one_issue):
    issue = one_issue(text)
    assert issue.path == path
    assert issue.line == line
    assert fragment in issue.message
    assert issue.file == "test.toml"
    assert fragment in issue.format() and path in issue.format()


def test_every_error_is_reported_not_just_the_first(issues_of):
    text = '''
[server]
workers = 0
bind_adress = "x"

[domains]
intercept_domains = ["ok.com", "b@d"]

[[targets.targets]]
name = "a"
url = "gopher://a"

[[targets.targets]]
name = "a"
url = "http://b"
weight = 0

[targets.health_check]
interval = 1
timeout = 2

[logging]
level = "loud"
'''
    got = {(e.path, e.line) for e in issues_of(text)}
    assert got == {
        ("server.workers", 3),
        ("server.bind_adress", 4),
        ("domains.intercept_domains[1]", 7),
        ("targets.targets[0].url", 11),
        ("targets.targets[1].weight", 16),
        ("targets.health_check.timeout", 20),
        ("logging.level", 23),
    }


def test_cross_checks_run_on_items_that_built(issues_of):
    text = TARGETS + '''
[[targets.targets]]
name = "a"
url = "http://10.0.0.9"
weight = -1

[[targets.targets]]
name = "a"
url = "http://10.0.0.3"
'''
    got = {e.path for e in issues_of(text)}
    # item 1 failed to build, so only item 2 is compared with item 0
    assert got == {"targets.targets[1].weight", "targets.targets[2].name"}


def test_toml_syntax_error_has_line(one_issue):
    issue = one_issue('[server]\nworkers = \n')
    assert issue.line == 2 and "TOML syntax error" in issue.message


def test_yaml_syntax_error_has_line(one_issue):
    issue = one_issue('server:\n  workers: [1,\n', fmt="yaml")
    assert issue.line is not None and "YAML syntax error" in issue.message


@pytest.mark.parametrize("fmt, text", [("toml", ""), ("yaml", ""), ("yaml", "- a\n"),
                                       ("yaml", "42\n")])
def test_empty_or_non_table_documents(fmt, text, one_issue):
    issue = one_issue(text, fmt=fmt)
    assert issue.path in ("targets.targets", None)


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "cannot read" in info.value.errors[0].message
    assert check_file(tmp_path / "missing.toml")[0].file.endswith("missing.toml")


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nvia = "\xe9"\n')
    assert "UTF-8" in check_file(path)[0].message


def test_bad_workers_override(minimal):
    with pytest.raises(ConfigError):
        load_config_text(minimal, fmt="toml", workers_override=-1)


def test_unknown_format(minimal):
    with pytest.raises(ConfigError):
        load_config_text(minimal, fmt="ini")  # type: ignore[arg-type]
