-- The Redis store's Lua scripts. Each "-- name:" section is one script; "common" is prepended
-- to every other one. ARGV[1] is always the key prefix. Topic names and ordering keys only
-- ever appear in key names hex-encoded (th, kh), so no name can collide with or break another.
--
-- Keys, under the prefix P:
--   P:pos            counter: the position of each appended message (its order in the outbox)
--   P:fence          counter: the fencing token of each lease
--   P:m:<id>         hash: one message (topic, key, th, kh, data, attrs, created, avail,
--                    attempts, pos, error, failed_at, state; progress when the relay saved
--                    some; publish_id and settled_at when it is kept settled)
--   P:q:<th>:<kh>    zset id -> pos: a sequence's messages that are due or held (in order)
--   P:w:<th>         zset id -> due time: a topic's delayed messages not yet moved to their q
--   P:i:<th>         zset kh -> when the sequence can next be worked (absent: empty or blocked)
--   P:l:<th>:<kh>    hash: the sequence's lease (token, expires)
--   P:p:<th>         zset id -> created: every pending message of a topic (for the backlog)
--   P:x:<th>         zset id -> pos: a topic's dead letters (parked and blocked)
--   P:dl             zset id -> pos: every dead letter
--   P:s:<th>         zset id -> settled time: a topic's published messages kept (MarkDetails.keep)
--   P:topics         set of th: the topics ever written
--   P:schema         string: the layout version (SCHEMA_VERSION in _scripts.py), set by migrate()
--
-- A message's state is '' (pending: due, delayed, or waiting for a retry), 'blocked' (failed with
-- no retry, still in its sequence), 'parked' (a dead letter out of its sequence) or 'settled'
-- (published and kept until purge_settled).

-- name: common
local P = ARGV[1]

local function k(...)
    return P .. ':' .. table.concat({...}, ':')
end

local function clock(given)
    if given ~= '' then
        return tonumber(given)
    end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
    return string.format('%.6f', x)
end

-- Put the sequence (th, kh) in its topic's index with the time it can next be worked, or take
-- it out when it is empty or its head is blocked.
local function refresh(th, kh, now)
    local idx = k('i', th)
    local head = redis.call('ZRANGE', k('q', th, kh), 0, 0)
    if #head == 0 then
        redis.call('ZREM', idx, kh)
        return
    end
    local m = redis.call('HMGET', k('m', head[1]), 'attempts', 'avail')
    local score
    if tonumber(m[1]) > 0 then
        if m[2] == '' then
            redis.call('ZREM', idx, kh)
            return
        end
        score = tonumber(m[2])
    else
        score = now
        local current = redis.call('ZSCORE', idx, kh)
        if current and tonumber(current) < now then
            score = tonumber(current) -- keep its place in the line
        end
    end
    local expires = redis.call('HGET', k('l', th, kh), 'expires')
    if expires and tonumber(expires) > score then
        score = tonumber(expires)
    end
    redis.call('ZADD', idx, fmt(score), kh)
end

-- Write one new message at the next position: the persister's append, and a close's follow-ups.
-- Its eight fields are ARGV[at .. at + 7]: id, th, kh, topic, key, data, attrs, deliver_after
-- ('' or unix seconds); entry_args() in persister.py builds them. The caller has checked that the
-- id is free. Returns the position; raises nothing.
local function append_message(at, now)
    local id, th, kh = ARGV[at], ARGV[at + 1], ARGV[at + 2]
    local pos = redis.call('INCR', k('pos'))
    local avail = now
    local deliver_after = tonumber(ARGV[at + 7])
    if deliver_after and deliver_after > now then
        avail = deliver_after
    end
    redis.call('HSET', k('m', id), 'topic', ARGV[at + 3], 'key', ARGV[at + 4], 'th', th,
        'kh', kh, 'data', ARGV[at + 5], 'attrs', ARGV[at + 6], 'created', fmt(now),
        'avail', fmt(avail), 'attempts', 0, 'pos', pos, 'error', '', 'failed_at', '', 'state', '')
    redis.call('SADD', k('topics'), th)
    redis.call('ZADD', k('p', th), fmt(now), id)
    if avail > now then
        redis.call('ZADD', k('w', th), fmt(avail), id)
    else
        local q = k('q', th, kh)
        redis.call('ZADD', q, pos, id)
        if redis.call('ZCARD', q) == 1 then
            refresh(th, kh, now)
        end
    end
    return pos
end

-- name: append
-- ARGV: prefix, id, th, kh, topic, key, data, attrs, deliver_after ('' or unix seconds), channel
local id = ARGV[2]
if redis.call('EXISTS', k('m', id)) == 1 then
    error(redis.error_reply('outboxbind: outbox id ' .. id .. ' is taken'))
end
local pos = append_message(2, clock(''))
redis.call('PUBLISH', ARGV[10], '1')
return pos

-- name: checkout
-- ARGV: prefix, now, lease seconds, limit, nonce, th...
-- Returns {now, {th, kh, token, {id, topic, key, data, attrs, created, attempts, progress}...}...}
local now = clock(ARGV[2])
local lease, limit, nonce = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local candidates = {}
for i = 6, #ARGV do
    local th = ARGV[i]
    local w = k('w', th)
    -- delayed messages that became due join their sequence at their own position
    local due = redis.call('ZRANGEBYSCORE', w, '-inf', fmt(now), 'LIMIT', 0, 1000)
    for _, id in ipairs(due) do
        redis.call('ZREM', w, id)
        local m = redis.call('HMGET', k('m', id), 'kh', 'pos')
        if m[1] then
            local q = k('q', th, m[1])
            redis.call('ZADD', q, m[2], id)
            if redis.call('ZRANK', q, id) == 0 then
                refresh(th, m[1], now)
            end
        end
    end
    local seqs = redis.call('ZRANGEBYSCORE', k('i', th), '-inf', fmt(now), 'WITHSCORES',
        'LIMIT', 0, limit)
    for j = 1, #seqs, 2 do
        candidates[#candidates + 1] = {tonumber(seqs[j + 1]), th, seqs[j]}
    end
end
-- the sequences that have waited longest first
table.sort(candidates, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[3] < b[3]
end)
local n = math.min(#candidates, limit)
if n == 0 then
    return {fmt(now)}
end
local share = math.ceil(limit / n)
local lists = {}
for c = 1, n do
    local th, kh = candidates[c][2], candidates[c][3]
    local ids = redis.call('ZRANGE', k('q', th, kh), 0, share - 1)
    local ready = {}
    for _, id in ipairs(ids) do
        local m = redis.call('HMGET', k('m', id), 'attempts', 'avail')
        if tonumber(m[1]) > 0 and (m[2] == '' or tonumber(m[2]) > now) then
            break -- waiting for a retry, or blocked: the rest of the sequence waits too
        end
        ready[#ready + 1] = id
    end
    lists[c] = ready
end
-- an even share each, layer by layer, cut at the limit
local counts = {}
for c = 1, n do counts[c] = 0 end
local chosen, depth = 0, 1
while chosen < limit do
    local any = false
    for c = 1, n do
        if chosen < limit and depth <= #lists[c] then
            counts[c] = depth
            chosen = chosen + 1
            any = true
        end
    end
    if not any then break end
    depth = depth + 1
end
local out = {fmt(now)}
for c = 1, n do
    local th, kh = candidates[c][2], candidates[c][3]
    if counts[c] > 0 then
        local token = redis.call('INCR', k('fence')) .. '-' .. nonce
        redis.call('HSET', k('l', th, kh), 'token', token, 'expires', fmt(now + lease))
        redis.call('ZADD', k('i', th), fmt(now + lease), kh)
        local seq = {th, kh, token}
        for d = 1, counts[c] do
            local id = lists[c][d]
            local m = redis.call('HMGET', k('m', id), 'topic', 'key', 'data', 'attrs', 'created',
                'attempts', 'progress')
            seq[#seq + 1] = {id, m[1], m[2], m[3], m[4], m[5], m[6], m[7]}
        end
        out[#out + 1] = seq
    else
        refresh(th, kh, now) -- a stale index entry: put it right
    end
end
return out

-- name: close
-- ARGV: prefix, now, JSON [[th, kh, token, [[kind, id, detail, retry seconds or null, details?]...]]
-- ...], wake-up channel, then the texts the details name.
-- A mark's details (only when the relay gave MarkDetails) are {progress = i, keep = i,
-- follow_ups = {i...}}, every part optional, each i the ARGV index of a text: the progress to
-- keep, the publish id of a published message to keep settled, the first of a follow-up's eight
-- fields (see append_message).
-- Returns the {th, kh} whose lease was taken over (nothing of theirs was changed).
local now = clock(ARGV[2])
local held, lost = {}, {}
for _, s in ipairs(cjson.decode(ARGV[3])) do
    if redis.call('HGET', k('l', s[1], s[2]), 'token') == s[3] then
        held[#held + 1] = s
    else
        lost[#lost + 1] = {s[1], s[2]}
    end
end

-- Redis does not roll back a script: whatever can fail is checked before the first write, so a
-- close applies its marks, their progress and their follow-ups all, or (with an error) none.
-- Every mark with details names a text, so without texts (the common case) there is no check.
if ARGV[5] then
    local new_ids = {}
    for _, s in ipairs(held) do
        for _, o in ipairs(s[4]) do
            local d = o[5]
            if d then
                if (d.progress and not ARGV[d.progress]) or (d.keep and not ARGV[d.keep]) then
                    return redis.error_reply('outboxbind: a close names a text it was not given')
                end
                for _, at in ipairs(d.follow_ups or {}) do
                    local id = ARGV[at]
                    if not ARGV[at + 7] then
                        return redis.error_reply(
                            'outboxbind: a close names a text it was not given')
                    end
                    if new_ids[id] or redis.call('EXISTS', k('m', id)) == 1 then
                        return redis.error_reply('outboxbind: outbox id ' .. id .. ' is taken')
                    end
                    new_ids[id] = true
                end
            end
        end
    end
end

local written = 0 -- follow-ups

for _, s in ipairs(held) do
    local th, kh, outcomes = s[1], s[2], s[4]
    local q = k('q', th, kh)
    for _, o in ipairs(outcomes) do
        local kind, id, d = o[1], o[2], o[5]
        local mk = k('m', id)
        if redis.call('EXISTS', mk) == 1 then
            if d then
                if d.progress then
                    redis.call('HSET', mk, 'progress', ARGV[d.progress])
                end
                for _, at in ipairs(d.follow_ups or {}) do
                    append_message(at, now)
                    written = written + 1
                end
            end
            if kind == 'published' then
                redis.call('ZREM', q, id)
                redis.call('ZREM', k('p', th), id)
                if d and d.keep then
                    redis.call('HSET', mk, 'state', 'settled', 'publish_id', ARGV[d.keep],
                        'settled_at', fmt(now))
                    redis.call('ZADD', k('s', th), fmt(now), id)
                else
                    redis.call('DEL', mk)
                end
            elseif kind == 'failed' then
                local avail = ''
                if type(o[4]) == 'number' then
                    avail = fmt(now + o[4])
                end
                redis.call('HINCRBY', mk, 'attempts', 1)
                redis.call('HSET', mk, 'error', o[3], 'failed_at', fmt(now), 'avail', avail)
                if avail == '' then
                    local pos = redis.call('HGET', mk, 'pos')
                    redis.call('HSET', mk, 'state', 'blocked')
                    redis.call('ZADD', k('dl'), pos, id)
                    redis.call('ZADD', k('x', th), pos, id)
                end
            else
                redis.call('HINCRBY', mk, 'attempts', 1)
                redis.call('HSET', mk, 'error', o[3], 'failed_at', fmt(now), 'state', 'parked')
                redis.call('ZREM', q, id)
                redis.call('ZREM', k('p', th), id)
                local pos = redis.call('HGET', mk, 'pos')
                redis.call('ZADD', k('dl'), pos, id)
                redis.call('ZADD', k('x', th), pos, id)
            end
        end
    end
    redis.call('DEL', k('l', th, kh))
    refresh(th, kh, now)
end
if written > 0 then
    redis.call('PUBLISH', ARGV[4], '1') -- wake the relays, as the persister's append does
end
return lost

-- name: dead_letters
-- ARGV: prefix, th ('' for every topic), limit
-- Returns {id, topic, key, data, attrs, created, attempts, progress, error, failed_at, state}...
local source = k('dl')
if ARGV[2] ~= '' then
    source = k('x', ARGV[2])
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', source, 0, tonumber(ARGV[3]) - 1)) do
    local m = redis.call('HMGET', k('m', id), 'topic', 'key', 'data', 'attrs', 'created',
        'attempts', 'progress', 'error', 'failed_at', 'state')
    if m[1] then
        out[#out + 1] = {id, m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10]}
    end
end
return out

-- name: replay
-- ARGV: prefix, now, id... Returns how many dead letters were made pending again.
local now = clock(ARGV[2])
local count = 0
for i = 3, #ARGV do
    local id = ARGV[i]
    if redis.call('ZSCORE', k('dl'), id) then
        local mk = k('m', id)
        local m = redis.call('HMGET', mk, 'th', 'kh', 'state', 'pos', 'created')
        local th, kh = m[1], m[2]
        redis.call('ZREM', k('dl'), id)
        redis.call('ZREM', k('x', th), id)
        redis.call('HSET', mk, 'attempts', 0, 'error', '', 'failed_at', '', 'state', '',
            'avail', fmt(now))
        if m[3] == 'parked' then
            redis.call('ZADD', k('p', th), m[5], id)
        end
        redis.call('ZADD', k('q', th, kh), m[4], id)
        refresh(th, kh, now)
        count = count + 1
    end
end
return count

-- name: purge
-- ARGV: prefix, now, id... Returns how many dead letters were deleted.
local now = clock(ARGV[2])
local count = 0
for i = 3, #ARGV do
    local id = ARGV[i]
    if redis.call('ZSCORE', k('dl'), id) then
        local mk = k('m', id)
        local m = redis.call('HMGET', mk, 'th', 'kh', 'state')
        local th, kh = m[1], m[2]
        redis.call('ZREM', k('dl'), id)
        redis.call('ZREM', k('x', th), id)
        redis.call('DEL', mk)
        if m[3] == 'blocked' then
            redis.call('ZREM', k('q', th, kh), id)
            redis.call('ZREM', k('p', th), id)
            refresh(th, kh, now)
        end
        count = count + 1
    end
end
return count

-- name: backlog
-- ARGV: prefix, now. Returns {th, pending, oldest due created ('' if none), dead} per topic.
local now = clock(ARGV[2])
local out = {}
for _, th in ipairs(redis.call('SMEMBERS', k('topics'))) do
    local pending = redis.call('ZCARD', k('p', th))
    local dead = redis.call('ZCARD', k('x', th))
    if pending + dead > 0 then
        local oldest = ''
        local first = redis.call('ZRANGE', k('p', th), 0, 999, 'WITHSCORES')
        for j = 1, #first, 2 do
            local avail = redis.call('HGET', k('m', first[j]), 'avail')
            if avail == '' or (avail and tonumber(avail) <= now) then
                oldest = first[j + 1]
                break
            end
        end
        out[#out + 1] = {th, pending, oldest, dead}
    end
end
return out

-- name: find
-- ARGV: prefix, id. Returns {id, topic, key, data, attrs, created, attempts, progress, error,
-- failed_at, state, publish_id, settled_at}, or nil when there is no such message (any more).
local id = ARGV[2]
local m = redis.call('HMGET', k('m', id), 'topic', 'key', 'data', 'attrs', 'created', 'attempts',
    'progress', 'error', 'failed_at', 'state', 'publish_id', 'settled_at')
if not m[1] then
    return nil
end
return {id, m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], m[12]}

-- name: purge_settled
-- ARGV: prefix, now, seconds, th, limit. Deletes up to limit kept settled messages of the topic
-- settled more than seconds before now. Returns {how many, now}: pass that now back to go on.
local now = clock(ARGV[2])
local settled = k('s', ARGV[4])
local old = redis.call('ZRANGEBYSCORE', settled, '-inf', '(' .. fmt(now - tonumber(ARGV[3])),
    'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(old) do
    redis.call('DEL', k('m', id))
    redis.call('ZREM', settled, id)
end
return {#old, fmt(now)}
