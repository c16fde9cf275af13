"""Every `sql` block of README.md runs as written: all of them, in order, as one psql session
against the test cluster."""

import re
import subprocess

from conftest import ENV, ROOT


def test_every_sql_example_in_the_readme_runs(db, tmp_path):
    blocks = re.findall(r"^```sql\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 6, "the README's SQL examples were not found"
    db.execute("DROP TABLE IF EXISTS public.users CASCADE")
    script = tmp_path / "readme.sql"
    script.write_text("\n".join(blocks))
    try:
        run = subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", ENV["QPG_HOME"], "-p", ENV["QPG_PGPORT"],
             "-U", "postgres", "-d", "postgres", "-f", str(script)],
            capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, f"a README example failed:\n{run.stderr}\n--- output ---\n{run.stdout[-3000:]}"
        # The examples did what they say.
        assert "retry_scheduled" in run.stdout and '"status": "failed"' in run.stdout
        assert db.execute("SELECT count(*) FROM queue.jobs WHERE payload->>'table' = 'public.users'").fetchone()[0] == 2
    finally:
        db.execute("DROP TABLE IF EXISTS public.users CASCADE")
