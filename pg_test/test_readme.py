"""Every `sql` block of README.md and of each docs/*.md runs as written: all the blocks of one
file, in order, as one psql session against the test cluster."""

import re
import subprocess

import pytest

from conftest import ENV, ROOT

DOCS = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))


def sql_blocks(name):
    return re.findall(r"^```sql\n(.*?)^```", (ROOT / name).read_text(), re.S | re.M)


def run_blocks(name, tmp_path):
    script = tmp_path / "blocks.sql"
    script.write_text("\n".join(sql_blocks(name)))
    run = subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", ENV["QPG_HOME"], "-p", ENV["QPG_PGPORT"],
         "-U", "postgres", "-d", "postgres", "-f", str(script)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"an example of {name} failed:\n{run.stderr}\n--- output ---\n{run.stdout[-3000:]}"
    return run.stdout


def test_every_sql_example_in_the_readme_runs(db, tmp_path):
    assert len(sql_blocks("README.md")) >= 6, "the README's SQL examples were not found"
    db.execute("DROP TABLE IF EXISTS public.users CASCADE")
    try:
        out = run_blocks("README.md", tmp_path)
        # The examples did what they say.
        assert "retry_scheduled" in out and '"status": "failed"' in out
        assert db.execute("SELECT count(*) FROM queue.jobs WHERE payload->>'table' = 'public.users'").fetchone()[0] == 2
    finally:
        db.execute("DROP TABLE IF EXISTS public.users CASCADE")


@pytest.mark.parametrize("name", [d for d in DOCS if d != "README.md"])
def test_every_sql_example_in_the_docs_runs(db, tmp_path, name):
    if not sql_blocks(name):
        pytest.skip(f"{name} has no SQL examples")
    run_blocks(name, tmp_path)


def test_every_link_stays_inside_the_repository():
    for name in DOCS:
        text = (ROOT / name).read_text()
        assert "SPEC.md" not in text, name
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path = ((ROOT / name).parent / target).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{name} links to {target}"
