-- Demo schema for rules/derived.json (scripts/demo, step 6; tests/e2e/test_demo.sh):
-- derived cache entries (a team's member list shows its members' names),
-- write-through re-warming and stale-while-revalidate (docs/rules.md).
--
-- REPLICA IDENTITY DEFAULT is enough everywhere: the rules' templates and
-- the lookup's argument only use key columns ({id}, {team_id}), and
-- refresh stores the new row, which PostgreSQL always sends.

CREATE TABLE IF NOT EXISTS public.users (
    id   bigint PRIMARY KEY,
    name text
);

CREATE TABLE IF NOT EXISTS public.teams (
    id   bigint PRIMARY KEY,
    name text
);

-- The join table: which users are members of which teams.
CREATE TABLE IF NOT EXISTS public.team_members (
    team_id bigint REFERENCES public.teams,
    user_id bigint REFERENCES public.users,
    PRIMARY KEY (team_id, user_id)
);

CREATE TABLE IF NOT EXISTS public.products (
    id    bigint PRIMARY KEY,
    name  text,
    price numeric
);
