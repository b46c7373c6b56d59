-- Demo schema for rules/example.json (used by scripts/demo and the e2e tests).
--
-- users and products need REPLICA IDENTITY FULL: their rules use old values
-- of columns outside the primary key ({team_id} on users; {sku} and
-- {category} on products), and under REPLICA IDENTITY DEFAULT PostgreSQL
-- sends only key columns for updates and deletes (walbust check --pg refuses
-- such rules, docs/guarantees.md guarantee 7). teams only uses {id}, its key, so DEFAULT is enough.

CREATE TABLE IF NOT EXISTS public.users (
    id      bigint PRIMARY KEY,
    name    text,
    email   text,
    team_id bigint
);
ALTER TABLE public.users REPLICA IDENTITY FULL;

CREATE TABLE IF NOT EXISTS public.teams (
    id   bigint PRIMARY KEY,
    name text
);

CREATE TABLE IF NOT EXISTS public.products (
    id       bigint PRIMARY KEY,
    sku      text UNIQUE,
    price    numeric,
    category text
);
ALTER TABLE public.products REPLICA IDENTITY FULL;
