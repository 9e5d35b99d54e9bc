"""The Redis backend's server-side steps, in Lua: each one atomic, each one
touching the keys of one inbox only (one hash tag, so one Cluster slot).

Every inbox script takes the same KEYS (redis_storage.inbox_keys):

  1 i   HASH  the inbox's meta: cap, resv (places reserved for woken senders),
              its share of the shared counters; exists while the inbox does
  2 q   ZSET  the inbox: msg_ids, score 0 (-1 for a high-priority one, whose id
              ends in -hi), so ordered by priority, then by name = (timestamp, sequence)
  3 b   HASH  msg_id -> the message's bytes (in the inbox or claimed)
  4 v   HASH  msg_id -> "<expiry ms>|<consumer>": read by a consumer, not yet taken
  5 c   HASH  msg_id -> consumer holding the claim
  6 cn  HASH  consumer -> how many claims it holds here
  7 l   ZSET  consumer -> its lease's expiry (ms, server clock)
  8 s   HASH  sender -> last sequence number of the pair (sender, this inbox)
  9 w   LIST  tokens of the senders waiting for room, in arrival order
 10 wd  HASH  token -> the waiting sender's deadline (ms): it has given up after it
 11 r   HASH  token -> expiry (ms) of the place reserved for that woken sender
and builds one more name itself: <prefix>k:<token>, the list a waiting sender
blocks on (BLPOP), in the same slot.

Times come from the server (TIME), so every host reads one clock.
"""
from __future__ import annotations

import hashlib

_PARTS = r"""
-- Calls f(part) on ids in parts of at most 512 (unpack's limit on arguments).
local function in_parts(ids, f)
  for j = 1, #ids, 512 do
    local part = {}
    for x = j, math.min(j + 511, #ids) do part[#part + 1] = ids[x] end
    f(part)
  end
end
-- redis.call(cmd, key, unpack(args)), in_parts: one call for a batch, not one an
-- item (pairs stay whole: 512 is even).
local function call_many(cmd, key, args)
  in_parts(args, function(part) redis.call(cmd, key, unpack(part)) end)
end
-- The sender's outbox copies: kv holds ids and their bodies (id, body, ...),
-- added to the outbox's ZSET kz (score 0) and bytes kb, kept to max (0: no
-- bound), oldest out first. -> how many old ones went.
local function copy_out(kz, kb, kv, max)
  local z = {}
  for j = 1, #kv, 2 do z[#z + 1] = '0'; z[#z + 1] = kv[j] end  -- a string: no %.14g per score
  call_many('ZADD', kz, z)
  call_many('HSET', kb, kv)
  if max <= 0 then return 0 end
  local over = redis.call('ZCARD', kz) - max
  if over <= 0 then return 0 end
  local old = redis.call('ZPOPMIN', kz, over)
  local gone = {}
  for j = 1, #old, 2 do gone[#gone + 1] = old[j] end
  call_many('HDEL', kb, gone)
  return over
end
-- Appends the pairs id, body of ids to out (the bodies from the hash kb); returns out.
local function with_bodies(out, ids, kb)
  in_parts(ids, function(part)
    local bodies = redis.call('HMGET', kb, unpack(part))
    for x = 1, #part do
      out[#out + 1] = part[x]
      out[#out + 1] = bodies[x]
    end
  end)
  return out
end
"""

# The inbox's key names, as the helpers below call them (KI, KQ, ...).
_NAMES = r"""
local KI, KQ, KB, KV, KC, KCN, KL, KS, KW, KWD, KR =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local P = string.sub(KI, 1, -2)
"""

_HELPERS = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(t[1]), tonumber(t[2])
end
-- The inbox's meta fields a send reads, in one HMGET (DELIVER, DELIVER_MANY):
-- pre.cap (nil: no meta), and what the helpers below take from pre instead
-- of reading each again, while this step has not written them.
local PRE = {'cap', 'lim', 'limu', 'cbs', 'cbu', 'cbk', 'cbp', 'cbf', 'resv', 'hhw', 'cw'}
local function pre_read()
  local m = redis.call('HMGET', KI, unpack(PRE))
  local pre = {}
  for j = 1, #PRE do pre[PRE[j]] = m[j] end
  return pre
end
-- The capacity normal sends may fill now: the adaptive limit (meta 'lim')
-- while fresh ('limu', ms), else the capacity.
local function eff_cap(cap, now, pre)
  local lim, limu
  if pre then
    lim, limu = pre.lim, pre.limu
  else
    local m = redis.call('HMGET', KI, 'lim', 'limu')
    lim, limu = m[1], m[2]
  end
  lim = tonumber(lim or '0')
  if lim > 0 and lim < cap and tonumber(limu or '0') > now then return lim end
  return cap
end
-- A message's age in us from its id: msg-<sec>-<seq>-<5 hex: the microsecond it was sent>...
local function sojourn_of(id, now)
  local sec, us = string.match(id, '^msg%-(%d+)%-%d+%-(%x%x%x%x%x)')
  if not sec then return nil end
  us = tonumber(us, 16)
  if us > 999999 then return nil end
  local age = now * 1000 - (tonumber(sec) * 1000000 + us)
  if age < 0 then age = 0 end
  return age
end
local function sojourn_add(sum, n)
  if n > 0 then
    redis.call('HINCRBY', KI, 'sjs', math.floor(sum))
    redis.call('HINCRBY', KI, 'sjn', n)
  end
end
local function held()
  return redis.call('ZCARD', KQ) + redis.call('HLEN', KC)
end
-- A message's score in the inbox: -1 for a high-priority one (its id ends in -hi), else 0.
local function score(id)
  if string.sub(id, -3) == '-hi' then return -1 end
  return 0
end
-- n messages arrived: the arrivals ('sent' + 'arr' of the meta, which only
-- grow while the inbox lives) move, and consumers waiting for one ('cw' of
-- them) find a push on <inbox>ar (one each at most) that ends their BLPOP.
-- sent: the caller counted them in 'sent' already (a delivery), so 'arr',
-- which counts the other arrivals (recovered claims), is left alone.
local function arrived(n, pre, sent)
  if not sent then redis.call('HINCRBY', KI, 'arr', n) end
  local cw
  if pre then cw = tonumber(pre.cw or '0') else cw = tonumber(redis.call('HGET', KI, 'cw') or '0') end
  if cw > 0 and redis.call('LLEN', P .. 'ar') < cw then
    redis.call('RPUSH', P .. 'ar', '1')
    redis.call('PEXPIRE', P .. 'ar', 60000)
  end
end
-- Claims whose consumer's lease ran out go back to the inbox.
local function recover(now)
  local dead = redis.call('ZRANGEBYSCORE', KL, '-inf', now)
  if #dead == 0 then return 0 end
  local gone = {}
  for _, o in ipairs(dead) do gone[o] = true; redis.call('HDEL', KCN, o) end
  redis.call('ZREMRANGEBYSCORE', KL, '-inf', now)
  local n = 0
  local all = redis.call('HGETALL', KC)
  for j = 1, #all, 2 do
    if gone[all[j + 1]] then
      redis.call('HDEL', KC, all[j])
      redis.call('ZADD', KQ, score(all[j]), all[j])
      n = n + 1
    end
  end
  if n > 0 then redis.call('HINCRBY', KI, 'recovered', n); arrived(n) end
  return n
end
-- Places freed per second (server clock), the current second and the one
-- before, in the meta hash ('dr0', 'dr1': "<second>:<places>"): retry_after.
local function drained(n, now)
  if n <= 0 then return end
  local sec = math.floor(now / 1000)
  local f = 'dr' .. (sec % 2)
  local v = redis.call('HGET', KI, f)
  local c = 0
  if v then
    local bar = string.find(v, ':', 1, true)
    if tonumber(string.sub(v, 1, bar - 1)) == sec then c = tonumber(string.sub(v, bar + 1)) end
  end
  redis.call('HSET', KI, f, sec .. ':' .. (c + n))
end
-- When `need` more places will have been freed at the drain rate of the last
-- second, in ms from now; -1 when nothing drained in it.
local function eta_ms(need, now)
  if need <= 0 then return 0 end
  local sec = math.floor(now / 1000)
  local rate = 0
  for back = 0, 1 do
    local v = redis.call('HGET', KI, 'dr' .. ((sec - back) % 2))
    if v then
      local bar = string.find(v, ':', 1, true)
      if tonumber(string.sub(v, 1, bar - 1)) == sec - back then
        local c = tonumber(string.sub(v, bar + 1))
        if back == 0 then rate = rate + c else rate = rate + c * (1000 - now % 1000) / 1000 end
      end
    end
  end
  if rate <= 0 then return -1 end
  return math.floor(need * 1000 / rate)
end
-- The circuit breaker (the file backend's slot word, as fields of the meta
-- hash): cbs state (0 closed, 1 open, 2 half-open), cbf failures in a row, cbu
-- until (ms: open, when probes may go; half-open, when the round must have
-- reported), cbk probe limit, cbp probes admitted; circuit_rejected (and
-- circuit_opened, circuit_closed) its share of the shared counters; cbw0 and
-- cbw1 the failure rate's window buckets ("<index>:<calls>:<failures>").
-- cfg: the sender's settings, "failures,rate %,window ms,min calls,cooldown ms,probes,headroom %".
-- Parsed once per text where the helpers outlive the call (the function
-- library), read-only to callers; kept to 64 texts.
local CFGS, NCFGS = {}, 0
local function cb_cfg(text)
  local t = CFGS[text]
  if t then return t end
  t = {}
  for x in string.gmatch(text, '[^,]+') do t[#t + 1] = tonumber(x) end
  if NCFGS >= 64 then CFGS, NCFGS = {}, 0 end
  CFGS[text], NCFGS = t, NCFGS + 1
  return t
end
-- 0 admitted, 1 admitted as a probe, or -(ms until it admits) refused.
local function cb_admit(now, cfg, pre)
  local m
  if pre then m = {pre.cbs, pre.cbu, pre.cbk, pre.cbp} else m = redis.call('HMGET', KI, 'cbs', 'cbu', 'cbk', 'cbp') end
  local st = tonumber(m[1] or '0')
  if st ~= 1 and st ~= 2 then return 0 end
  local left = tonumber(m[2] or '0') - now
  if left > 3601000 then left = 0 end
  local limit = tonumber(m[3] or '0')
  if limit < 1 then limit = cfg[6] end
  if st == 2 and left > 0 and tonumber(m[4] or '0') < limit then
    redis.call('HINCRBY', KI, 'cbp', 1)
    return 1
  end
  if left <= 0 then
    redis.call('HSET', KI, 'cbs', 2, 'cbp', 1, 'cbk', limit, 'cbu', now + cfg[5])
    return 1
  end
  redis.call('HINCRBY', KI, 'circuit_rejected', 1)
  return -left
end
local function cb_window(failed, now, cfg)
  local win = cfg[3]
  local idx = math.floor(now / win)
  local f = 'cbw' .. (idx % 2)
  local calls, fails = 0, 0
  local v = redis.call('HGET', KI, f)
  if v then
    local a, b, c = string.match(v, '^(%d+):(%d+):(%d+)$')
    if tonumber(a) == idx then calls, fails = tonumber(b), tonumber(c) end
  end
  calls = calls + 1
  if failed then fails = fails + 1 end
  redis.call('HSET', KI, f, idx .. ':' .. calls .. ':' .. fails)
  if not failed then return false end
  local pcalls, pfails = 0, 0
  local pv = redis.call('HGET', KI, 'cbw' .. ((idx - 1) % 2))
  if pv then
    local a, b, c = string.match(pv, '^(%d+):(%d+):(%d+)$')
    if tonumber(a) == idx - 1 then
      local share = (win - now % win) / win
      pcalls, pfails = tonumber(b) * share, tonumber(c) * share
    end
  end
  calls, fails = calls + pcalls, fails + pfails
  return calls >= cfg[4] and fails * 100 >= cfg[2] * calls
end
-- What a finished send tells the circuit: 1 it opened it, 2 it closed it, else 0.
local function cb_record(failed, now, cfg, pre)
  local rate = false
  if cfg[2] > 0 then rate = cb_window(failed, now, cfg) end
  local m
  if pre and tonumber(pre.cbs or '0') == 0 then m = {pre.cbs, pre.cbf} else m = redis.call('HMGET', KI, 'cbs', 'cbf') end
  local st = tonumber(m[1] or '0')
  if not failed then
    if st == 2 then
      redis.call('HSET', KI, 'cbs', 0, 'cbf', 0)
      redis.call('HINCRBY', KI, 'circuit_closed', 1)
      return 2
    end
    if st ~= 1 and tonumber(m[2] or '0') > 0 then redis.call('HSET', KI, 'cbf', 0) end
    return 0
  end
  if st == 1 then return 0 end
  local f = 0
  if st ~= 2 then f = redis.call('HINCRBY', KI, 'cbf', 1) end
  if st == 2 or (cfg[1] > 0 and f >= cfg[1]) or rate then
    redis.call('HSET', KI, 'cbs', 1, 'cbf', 0, 'cbu', now + cfg[5], 'cbk', cfg[6], 'cbp', 0)
    redis.call('HINCRBY', KI, 'circuit_opened', 1)
    return 1
  end
  return 0
end
-- Once an interval (the meta 'adt', ms), the adaptive limit moves as the C
-- core's cfn_adapt moves it (never below the last second's drain times the
-- target, plus its square root). spec: "target ms,interval ms,floor"; "" when off.
local function adapt(now, spec)
  if spec == '' then return end
  local t = cb_cfg(spec)
  local at = tonumber(redis.call('HGET', KI, 'adt') or '0')
  if at > 0 and now - at < t[2] and now >= at then return end
  redis.call('HSET', KI, 'adt', now)
  if at == 0 then return end
  local m = redis.call('HMGET', KI, 'sjs', 'sjn', 'cap')
  redis.call('HDEL', KI, 'sjs', 'sjn')
  local n, cap = tonumber(m[2] or '0'), tonumber(m[3] or '0')
  if n <= 0 or cap < 1 then return end
  local mean = tonumber(m[1] or '0') / n
  redis.call('HSET', KI, 'sju', math.floor(mean))
  local lim = eff_cap(cap, now)
  local g = math.max(0.5, math.min(1.0, t[1] * 1000 / math.max(mean, 1)))
  local nxt = lim + math.floor(math.sqrt(lim))
  if g < 1 then nxt = lim * g end
  if nxt > lim and held() < lim / 2 then nxt = lim end
  local e = eta_ms(1000, now)  -- 1,000 places at the last second's drain: the drain, per second
  if e > 0 then
    local drains = math.floor(1000 * t[1] / e)
    drains = drains + math.floor(math.sqrt(drains))
    if drains > nxt then nxt = drains end
  end
  nxt = math.max(math.max(t[3], 1), math.min(cap, math.floor(nxt)))
  redis.call('HSET', KI, 'lim', nxt, 'limu', now + math.max(10 * t[2], 1000))
end
-- The inbox's heaviest senders: a sorted set (<inbox>hh) of sender -> count,
-- halved every 10 s (the window in the meta hash's 'hhw'); the 16 heaviest kept.
local function senders_add(who, n, now, pre)
  local hk = P .. 'hh'
  local win = math.floor(now / 10000)
  local was
  if pre then was = tonumber(pre.hhw or '-1') else was = tonumber(redis.call('HGET', KI, 'hhw') or '-1') end
  if was ~= win then
    redis.call('HSET', KI, 'hhw', win)
    if was >= 0 then
      local f = 0.5 ^ math.max(0, math.min(win - was, 30))
      local all = redis.call('ZRANGE', hk, 0, -1, 'WITHSCORES')
      for j = 1, #all, 2 do
        local sc = math.floor(tonumber(all[j + 1]) * f)
        if sc < 1 then redis.call('ZREM', hk, all[j]) else redis.call('ZADD', hk, sc, all[j]) end
      end
    end
  end
  -- a score of n is a newcomer (counts are whole, and one under 1 is removed): only then can it overflow
  if tonumber(redis.call('ZINCRBY', hk, n, who)) == n and redis.call('ZCARD', hk) > 32 then
    redis.call('ZREMRANGEBYRANK', hk, 0, -17)
  end
end
-- Hands free places to waiting senders, first come first served: each gets a
-- reservation (so no newcomer takes its place) and a push on its wake list.
local function dispatch(now, ttl, resv0, waiting)
  if (resv0 and resv0 > 0) or (not resv0 and redis.call('HLEN', KR) > 0) then
    local rs = redis.call('HGETALL', KR)
    for j = 1, #rs, 2 do
      if tonumber(rs[j + 1]) < now then
        redis.call('HDEL', KR, rs[j])
        redis.call('HINCRBY', KI, 'resv', -1)
      end
    end
  end
  if (waiting or redis.call('LLEN', KW)) == 0 then return end
  local cap = eff_cap(tonumber(redis.call('HGET', KI, 'cap') or '0'), now)
  local resv = tonumber(redis.call('HGET', KI, 'resv') or '0')
  local n = held()
  while n + resv < cap do
    local tok = redis.call('LPOP', KW)
    if not tok then break end
    local dl = redis.call('HGET', KWD, tok)
    redis.call('HDEL', KWD, tok)
    if dl and tonumber(dl) >= now then
      redis.call('HSET', KR, tok, now + ttl)
      redis.call('HINCRBY', KI, 'resv', 1)
      resv = resv + 1
      local k = P .. 'k:' .. tok
      redis.call('RPUSH', k, '1')
      redis.call('PEXPIRE', k, ttl)
    end
  end
end
-- The sender's outbox copy goes in the same step when the caller passed the
-- sender's keys after the inbox's (one server, or a sender in this slot):
-- KEYS[12] the sender's meta (there when it was initialised), [13] its outbox
-- ZSET, [14] the bytes (copy_out above).
local function has_outbox()
  return #KEYS >= 14 and redis.call('EXISTS', KEYS[12]) == 1
end
"""

_PRELUDE = _PARTS + _NAMES + _HELPERS

# ARGV: sender, recipient, escaped type, payload, token, own capacity,
#       backpressure (0/1), final (0/1), waiter deadline (ms from now),
#       reservation ttl (ms), metric lines per event (0/1), id hex,
#       breaker settings (cb_cfg), admitted already (0/1: an earlier step of
#       this send passed the circuit), a final failure counts (0/1), high
#       priority (0/1: it may fill the headroom, and waits in no queue), outbox bound
# -> {0, msg_id, seq, ts, circuit, copied (1/0; -1: the sender's keys were not
#     passed), outbox copies pruned} delivered | {1, cap, eta ms or -1, circuit} full
#    | {2} no inbox | {3, ms} circuit open for that long
DELIVER = _PRELUDE + r"""
local pre = pre_read()
local tok, own, bp, final = ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1', ARGV[8] == '1'
local cap = tonumber(pre.cap)
if not cap then
  if redis.call('EXISTS', KI) == 0 then return {2} end
  cap = own
end
local ttl, ml = tonumber(ARGV[10]), tonumber(ARGV[11])
local cfg = cb_cfg(ARGV[13])
local high = ARGV[16] == '1'
if own < cap then cap = own; redis.call('HSET', KI, 'cap', own) end
local now, sec, usec = now_ms()
local limit = eff_cap(cap, now, pre)
if high then limit = cap + math.ceil(cap * cfg[7] / 100) end
if ARGV[14] ~= '1' then
  local adm = cb_admit(now, cfg, pre)
  if adm < 0 then return {3, -adm} end
end
local resv = tonumber(pre.resv or '0')
local waiting = redis.call('LLEN', KW)
if resv > 0 or waiting > 0 then
  dispatch(now, ttl, resv, waiting)
  resv = tonumber(redis.call('HGET', KI, 'resv') or '0')
  waiting = redis.call('LLEN', KW)
end
local ok = false
if tok ~= '' and resv > 0 and redis.call('HDEL', KR, tok) == 1 then
  redis.call('HINCRBY', KI, 'resv', -1)
  ok = true
else
  ok = held() + resv < limit and (high or waiting == 0)
end
if not ok then
  if not bp then
    redis.call('HINCRBY', KI, 'send_full', 1)
  elseif final then
    redis.call('HINCRBY', KI, 'backpressure_failure', 1)
    redis.call('HINCRBY', KI, 'metrics', ml)
    if redis.call('HDEL', KWD, tok) == 1 then redis.call('LREM', KW, 1, tok) end
    redis.call('DEL', P .. 'k:' .. tok)
    dispatch(now, ttl)
  else
    redis.call('HINCRBY', KI, 'backpressure_wait', 1)
    redis.call('HINCRBY', KI, 'metrics', ml)
    if redis.call('HSET', KWD, tok, now + tonumber(ARGV[9])) == 1 then
      redis.call('RPUSH', KW, tok)
    end
  end
  local circuit = 0
  if final and ARGV[15] == '1' then circuit = cb_record(true, now, cfg) end
  local ahead = held() + tonumber(redis.call('HGET', KI, 'resv') or '0') - limit + 1
  if not high then ahead = ahead + redis.call('LLEN', KW) end
  return {1, cap, eta_ms(ahead, now), circuit, limit - cap}
end
if tok ~= '' and redis.call('HDEL', KWD, tok) == 1 then redis.call('LREM', KW, 1, tok) end
local seq = redis.call('HINCRBY', KS, ARGV[1], 1)
local id = string.format('msg-%d-%010d-%05x%s', sec, seq, usec, string.sub(tok ~= '' and tok or ARGV[12], 1, 11))
local pri = ''
if high then id = id .. '-hi'; pri = '",\n  "priority": "high' end
local body = '{\n  "version": "1.1",\n  "msg_id": "' .. id .. '",\n  "from": "' .. ARGV[1] ..
  '",\n  "to": "' .. ARGV[2] .. '",\n  "timestamp": ' .. sec .. ',\n  "sequence": ' .. seq ..
  ',\n  "type": "' .. ARGV[3] .. pri .. '",\n  "payload": ' .. ARGV[4] .. ',\n  "requires_ack": false\n}\n'
redis.call('ZADD', KQ, score(id), id)
redis.call('HSET', KB, id, body)
redis.call('HINCRBY', KI, 'sent', 1)
if high then redis.call('HINCRBY', KI, 'sent_high', 1) end
senders_add(ARGV[1], 1, now, pre)
arrived(1, pre, true)
if bp then
  redis.call('HINCRBY', KI, 'backpressure_success', 1)
  redis.call('HINCRBY', KI, 'metrics', ml)
end
local circuit = cb_record(false, now, cfg, pre)
if #KEYS < 14 then return {0, id, seq, sec, circuit, -1, 0} end
if not has_outbox() then return {0, id, seq, sec, circuit, 0, 0} end
return {0, id, seq, sec, circuit, 1, copy_out(KEYS[13], KEYS[14], {id, body}, tonumber(ARGV[17]))}
"""

# Many payloads of one sender, as far as room allows, in one step.
# ARGV: sender, recipient, escaped type, own capacity, reservation ttl, breaker
#       settings (cb_cfg), high priority (0/1), outbox bound, then (hex, payload) pairs
# -> {delivered count, circuit, id, seq, ts, id, seq, ts, ..., copied (1/0/-1, as
#     DELIVER's), outbox copies pruned}; {-1}: no inbox; {-2, ms}: circuit open
DELIVER_MANY = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return {-1} end
local own, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local cfg = cb_cfg(ARGV[6])
local cap = tonumber(redis.call('HGET', KI, 'cap') or own)
if own < cap then cap = own; redis.call('HSET', KI, 'cap', own) end
local now, sec, usec = now_ms()
local adm = cb_admit(now, cfg)
if adm < 0 then return {-2, -adm} end
dispatch(now, ttl)
local high = ARGV[7] == '1'
local room = 0
if high then
  room = cap + math.ceil(cap * cfg[7] / 100) - held() - tonumber(redis.call('HGET', KI, 'resv') or '0')
elseif redis.call('LLEN', KW) == 0 then
  room = eff_cap(cap, now) - held() - tonumber(redis.call('HGET', KI, 'resv') or '0')
end
local out = {0, 0}
local n = 0
local copy, pruned = has_outbox(), 0
local head = '",\n  "to": "' .. ARGV[2] .. '",\n  "timestamp": ' .. sec .. ',\n  "sequence": '
local mid = ',\n  "type": "' .. ARGV[3] .. '",\n  "payload": '
local suffix = ''
if high then
  suffix = '-hi'
  mid = ',\n  "type": "' .. ARGV[3] .. '",\n  "priority": "high",\n  "payload": '
end
-- as many as there is room for, numbered by one HINCRBY, added by one ZADD and one HSET
n = math.max(0, math.min(room, math.floor((#ARGV - 8) / 2)))
if n > 0 then
  local first = redis.call('HINCRBY', KS, ARGV[1], n) - n
  local z, kv = {}, {}
  -- what every id and body of the batch shares, formatted once: the second, the microsecond
  -- (one TIME for the batch) and the score, a string (a number passed to redis.call is
  -- formatted by %.14g each time); only the sequence is formatted per message, by %d
  local ipre, ipost = 'msg-' .. string.format('%d', sec) .. '-', string.format('-%05x', usec)
  local scs = '0'
  if high then scs = '-1' end
  for k = 1, n do
    local j, seq = 7 + 2 * k, first + k
    local ss = string.format('%d', seq)
    local id = ipre .. string.rep('0', 10 - #ss) .. ss .. ipost .. string.sub(ARGV[j], 1, 11) .. suffix
    local body = '{\n  "version": "1.1",\n  "msg_id": "' .. id .. '",\n  "from": "' .. ARGV[1] ..
      head .. ss .. mid .. ARGV[j + 1] .. ',\n  "requires_ack": false\n}\n'
    z[#z + 1] = scs; z[#z + 1] = id
    kv[#kv + 1] = id; kv[#kv + 1] = body
    out[#out + 1] = id; out[#out + 1] = seq; out[#out + 1] = sec
  end
  call_many('ZADD', KQ, z)
  call_many('HSET', KB, kv)
  if copy then pruned = copy_out(KEYS[13], KEYS[14], kv, tonumber(ARGV[8])) end
end
out[1] = n
if n > 0 then
  redis.call('HINCRBY', KI, 'sent', n)
  if high then redis.call('HINCRBY', KI, 'sent_high', n) end
  senders_add(ARGV[1], n, now)
  arrived(n, nil, true)
  out[2] = cb_record(false, now, cfg)
end
out[#out + 1] = (#KEYS < 14) and -1 or (copy and 1 or 0)
out[#out + 1] = pruned
return out
"""

# ARGV: how many (-1 all), consumer, visibility (ms), claim (0/1), priority
#       ratio (high messages in a row while normal ones wait; 0: no limit)
# -> {count, id, body, id, body, ...}; {-1}: no inbox
READ = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return {-1} end
local want, me, ttl, claim = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local ratio = tonumber(ARGV[5] or '0')
local now = now_ms()
recover(now)
-- up to `want` messages of one score (priority) that no other consumer is reading, oldest first
local reading = redis.call('HLEN', KV) > 0
local function pick(sc)
  local got = {}
  local start = 0
  while want < 0 or #got < want do
    local chunk = redis.call('ZRANGEBYSCORE', KQ, sc, sc, 'LIMIT', start, 256)
    if #chunk == 0 then break end
    start = start + #chunk
    local marks = {}
    if reading then marks = redis.call('HMGET', KV, unpack(chunk)) end
    for x, id in ipairs(chunk) do
      local r = marks[x]
      local free = true
      if r then
        local bar = string.find(r, '|', 1, true)
        free = tonumber(string.sub(r, 1, bar - 1)) < now or string.sub(r, bar + 1) == me
      end
      if free then
        got[#got + 1] = id
        if want >= 0 and #got >= want then break end
      end
    end
  end
  return got
end
-- high-priority ones first, but no more than `ratio` in a row (the inbox's
-- run, 'hirun') while normal ones wait
local hi, lo = pick(-1), pick(0)
local run = tonumber(redis.call('HGET', KI, 'hirun') or '0')
local ids = {}
local i, j = 1, 1
while (want < 0 or #ids < want) and (i <= #hi or j <= #lo) do
  if i <= #hi and (j > #lo or ratio <= 0 or run < ratio) then
    ids[#ids + 1] = hi[i]; i = i + 1; run = run + 1
  else
    ids[#ids + 1] = lo[j]; j = j + 1; run = 0
  end
end
if #hi > 0 or #lo > 0 then redis.call('HSET', KI, 'hirun', run) end
local out = {#ids}
if #ids == 0 then return out end
local ssum, sn = 0, 0
local kv = {}
local mark = (now + ttl) .. '|' .. me
for _, id in ipairs(ids) do
  kv[#kv + 1] = id
  if claim then
    kv[#kv + 1] = me
    local age = sojourn_of(id, now)
    if age then ssum = ssum + age; sn = sn + 1 end
  else
    kv[#kv + 1] = mark
  end
end
if claim then
  call_many('ZREM', KQ, ids)
  if reading then call_many('HDEL', KV, ids) end
  call_many('HSET', KC, kv)
else
  call_many('HSET', KV, kv)
end
if claim then
  redis.call('HINCRBY', KCN, me, #ids)
  redis.call('ZADD', KL, now + ttl, me)
  sojourn_add(ssum, sn)
end
return with_bodies(out, ids, KB)
"""

# Every message, oldest first (whatever its priority, as files are listed), nothing changed.
# -> {count, id, body, ...}; {-1}: no inbox
PEEK = _PARTS + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
table.sort(ids)
return with_bodies({#ids}, ids, KEYS[3])
"""

# Deletes messages for good: from the inbox (the ZREM decides which consumer
# has it: exactly one) or from this consumer's claims (an ack).
# ARGV: consumer, from claims (0/1), reservation ttl, adaptive limit (adapt's
#       spec, "" when off), how many to release, released ids..., ids...
# -> {flag per id}; {-1}: no inbox
TAKE = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return {-1} end
local me, claims, ttl, spec, nrel = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
for j = 6, 5 + nrel do
  local r = redis.call('HGET', KV, ARGV[j])
  if r and string.sub(r, string.find(r, '|', 1, true) + 1) == me then redis.call('HDEL', KV, ARGV[j]) end
end
local out = {}
local n = 0
local tnow = now_ms()
local ssum, sn = 0, 0
local taken, seen, named = {}, {}, {}
for j = 6 + nrel, #ARGV do named[#named + 1] = ARGV[j] end
in_parts(named, function(part)
  -- claims: held by me (HMGET of the claim hash); else: still in the inbox (ZMSCORE)
  local here
  if claims then here = redis.call('HMGET', KC, unpack(part)) else here = redis.call('ZMSCORE', KQ, unpack(part)) end
  for x, id in ipairs(part) do
    local ok = 0
    if seen[id] then
      ok = 0  -- named twice: taken once
    elseif claims then
      if here[x] == me then ok = 1 end
    elseif here[x] then
      ok = 1
      local age = sojourn_of(id, tnow)
      if age then ssum = ssum + age; sn = sn + 1 end
    end
    if ok == 1 then taken[#taken + 1] = id; seen[id] = true; n = n + 1 end
    out[#out + 1] = ok
  end
end)
if n > 0 then
  if claims then
    call_many('HDEL', KC, taken)
  else
    call_many('ZREM', KQ, taken)
    call_many('HDEL', KV, taken)
  end
  call_many('HDEL', KB, taken)
  redis.call('HINCRBY', KI, 'consumed', n)
  if claims then
    if redis.call('HINCRBY', KCN, me, -n) <= 0 then
      redis.call('HDEL', KCN, me)
      redis.call('ZREM', KL, me)
    end
  end
  local now = now_ms()
  drained(n, now)
  sojourn_add(ssum, sn)
  adapt(now, spec)
  dispatch(now, ttl)
end
return out
"""

# Claims of this consumer back into the inbox (the named ones, or all of them).
# ARGV: consumer, all (0/1), ids... -> how many
PUT_BACK = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return 0 end
local me = ARGV[1]
local ids = {}
if ARGV[2] == '1' then
  local all = redis.call('HGETALL', KC)
  for j = 1, #all, 2 do if all[j + 1] == me then ids[#ids + 1] = all[j] end end
else
  for j = 3, #ARGV do ids[#ids + 1] = ARGV[j] end
end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('HGET', KC, id) == me then
    redis.call('HDEL', KC, id)
    redis.call('ZADD', KQ, score(id), id)
    n = n + 1
  end
end
if ARGV[2] == '1' or redis.call('HINCRBY', KCN, me, -n) <= 0 then
  redis.call('HDEL', KCN, me)
  redis.call('ZREM', KL, me)
end
if n > 0 then arrived(n) end
return n
"""

# Keeps this consumer's claims its own: ARGV consumer, lease (ms) -> 1 held, 0 lost
RENEW = _PRELUDE + r"""
if redis.call('ZSCORE', KL, ARGV[1]) == false then return 0 end
redis.call('ZADD', KL, now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# Moves bad messages aside: ARGV from claims (0/1), ids... -> how many
QUARANTINE = _PRELUDE + r"""
local n = 0
for j = 2, #ARGV do
  local id = ARGV[j]
  local gone = 0
  if ARGV[1] == '1' then gone = redis.call('HDEL', KC, id) else gone = redis.call('ZREM', KQ, id) end
  if gone == 1 then
    local body = redis.call('HGET', KB, id)
    if body then redis.call('HSET', P .. 'x', id, body) end
    redis.call('HDEL', KB, id)
    redis.call('HDEL', KV, id)
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KI, 'quarantined', n); dispatch(now_ms(), 1000) end
return n
"""

# Deletes every message in the inbox (claims stay). ARGV: reservation ttl -> how many
CLEAR = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return -1 end
local ids = redis.call('ZRANGE', KQ, 0, -1)
call_many('HDEL', KB, ids)
redis.call('DEL', KQ, KV)
dispatch(now_ms(), tonumber(ARGV[1]))
return #ids
"""

# The inbox's count, and with force (1) dead consumers' claims returned first.
# ARGV: force, reservation ttl -> {count, in inbox, claimed, recovered}; {-1}: no inbox
RECONCILE = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return {-1} end
local now = now_ms()
local rec = 0
if ARGV[1] == '1' then rec = recover(now) end
dispatch(now, tonumber(ARGV[2]))
redis.call('HSET', KI, 'rec', now)
local q, c = redis.call('ZCARD', KQ), redis.call('HLEN', KC)
return {q + c, q, c, rec}
"""

# Creates the inbox, its capacity the initialiser's. ARGV: capacity, created ms
INIT = r"""
redis.call('HSET', KEYS[1], 'cap', ARGV[1])
redis.call('HSETNX', KEYS[1], 'created', ARGV[2])
return 1
"""

# The inbox's capacity, lowered to the caller's when that is smaller.
# ARGV: own -> capacity; 0: no inbox
CAPACITY = r"""
local cap = redis.call('HGET', KEYS[1], 'cap')
if not cap then return 0 end
local own = tonumber(ARGV[1])
if own < tonumber(cap) then redis.call('HSET', KEYS[1], 'cap', own); return own end
return tonumber(cap)
"""

# {exists, held (inbox + claimed), cap, waiters, reconciled ms} of one inbox
SIZE = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0, 0, 0} end
local m = redis.call('HMGET', KEYS[1], 'cap', 'rec')
return {1, redis.call('ZCARD', KEYS[2]) + redis.call('HLEN', KEYS[5]), tonumber(m[1] or '0'),
        redis.call('LLEN', KEYS[9]), tonumber(m[2] or '0')}
"""

# The sender's outbox copy, kept to its bound. KEYS: o (ZSET), ob (HASH); ARGV: id, body, max (0: all)
OUTBOX = _PARTS + r"""
return copy_out(KEYS[1], KEYS[2], {ARGV[1], ARGV[2]}, tonumber(ARGV[3]))
"""

# Removes the inbox: returns its counters (for the shared totals) and wakes
# its waiting senders (they find no inbox). ARGV: counter names...
REMOVE = _PRELUDE + r"""
local vals = redis.call('HMGET', KI, unpack(ARGV))
local toks = redis.call('LRANGE', KW, 0, -1)
for _, t in ipairs(toks) do
  local k = P .. 'k:' .. t
  redis.call('RPUSH', k, '1')
  redis.call('PEXPIRE', k, 1000)
end
redis.call('DEL', KI, KQ, KB, KV, KC, KCN, KL, KS, KW, KWD, KR, P .. 'o', P .. 'ob', P .. 'x', P .. 'hh', P .. 'ar')
return vals
"""

# The inbox's heaviest senders, heaviest first, counts halved for the windows
# since the last send: -> {sender, count, sender, count, ...}
SENDERS = _PRELUDE + r"""
local win = math.floor(now_ms() / 10000)
local was = tonumber(redis.call('HGET', KI, 'hhw') or tostring(win))
local f = 0.5 ^ math.max(0, math.min(win - was, 30))
local all = redis.call('ZREVRANGE', P .. 'hh', 0, 7, 'WITHSCORES')
local out = {}
for j = 1, #all, 2 do
  local c = math.floor(tonumber(all[j + 1]) * f)
  if c > 0 then out[#out + 1] = all[j]; out[#out + 1] = c end
end
return out
"""

# Waiting for a message. ARGV: op ("look": the arrivals count; "enter": 1 when
# it moved from ARGV[2], else count this consumer as waiting, 0; "leave": uncount it)
ARRIVE = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return -1 end
local m = redis.call('HMGET', KI, 'arr', 'sent')
local arr = tonumber(m[1] or '0') + tonumber(m[2] or '0')
if ARGV[1] == 'look' then return arr end
if ARGV[1] == 'enter' then
  if arr ~= tonumber(ARGV[2]) then return 1 end
  redis.call('HINCRBY', KI, 'cw', 1)
  return 0
end
if redis.call('HINCRBY', KI, 'cw', -1) < 0 then redis.call('HSET', KI, 'cw', 0) end
return 0
"""

# The inbox's flow state: -> {held, cap, limit (0: none), sojourn us, drained over the last second,
#                             waiting senders, high-priority sent}; {-1}: no inbox
FLOW = _PRELUDE + r"""
if redis.call('EXISTS', KI) == 0 then return {-1} end
local now = now_ms()
local m = redis.call('HMGET', KI, 'cap', 'sju', 'sent_high')
local cap = tonumber(m[1] or '0')
local lim = eff_cap(cap, now)
if lim >= cap then lim = 0 end
local drained = 0
local e = eta_ms(1000, now)
if e > 0 then drained = math.floor(1000 * 1000 / e) end
return {held(), cap, lim, tonumber(m[2] or '0'), drained, redis.call('LLEN', KW), tonumber(m[3] or '0')}
"""

# The inbox's circuit: -> {state, failures, probes, probe limit, ms left, refused}
CIRCUIT = _PRELUDE + r"""
local m = redis.call('HMGET', KI, 'cbs', 'cbf', 'cbp', 'cbk', 'cbu', 'circuit_rejected')
local st = tonumber(m[1] or '0')
local left = 0
if st == 1 or st == 2 then
  left = tonumber(m[5] or '0') - now_ms()
  if left < 0 or left > 3601000 then left = 0 end
else
  st = 0
end
return {st, tonumber(m[2] or '0'), tonumber(m[3] or '0'), tonumber(m[4] or '0'), left, tonumber(m[6] or '0')}
"""

# Closes the inbox's circuit: -> the state it had
CIRCUIT_RESET = _PRELUDE + r"""
local st = tonumber(redis.call('HGET', KI, 'cbs') or '0')
if redis.call('EXISTS', KI) == 1 then
  redis.call('HSET', KI, 'cbs', 0, 'cbf', 0, 'cbp', 0)
  redis.call('HDEL', KI, 'cbw0', 'cbw1')
  if st == 1 or st == 2 then redis.call('HINCRBY', KI, 'circuit_closed', 1) end
end
if st == 1 or st == 2 then return st end
return 0
"""

# The shared alert cooldown: KEYS the entry, the counters; ARGV cooldown ms -> 1 go ahead, 0 inside it
COOLDOWN = r"""
if redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'NX') then return 1 end
redis.call('HINCRBY', KEYS[2], 'alerts_suppressed', 1)
return 0
"""


# The same steps as one Redis 7 function library (FUNCTION LOAD, FCALL): the
# helpers are defined once, when the library loads, not on every call as a
# script's prelude is (~8 us of a send's ~80 us of server time). Each function
# binds the call's keys and arguments to the names the helpers and its body
# use (one call runs at a time on the server), then runs the script's body as
# it is. The library's and the functions' names carry a hash of the scripts'
# text, so processes of two versions on one server each find their own.
_BIND = r"""
local KEYS, ARGV
local KI, KQ, KB, KV, KC, KCN, KL, KS, KW, KWD, KR, P
local function bind(k, a)
  KEYS, ARGV = k, a
  if #k >= 11 then
    KI, KQ, KB, KV, KC, KCN, KL, KS, KW, KWD, KR = k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8], k[9], k[10], k[11]
    P = string.sub(KI, 1, -2)
  end
end
"""


def library() -> tuple[str, str, dict[str, str]]:
    """(the library's name, its text for FUNCTION LOAD, script name -> function name)."""
    texts = {n: globals()[n] for n in sorted(__all__)}
    digest = hashlib.sha1("\0".join(texts.values()).encode()).hexdigest()[:16]
    lib = f"cfn_{digest}"
    names = {n: f"{lib}_{n.lower()}" for n in texts}
    out = [f"#!lua name={lib}\n", _PARTS, _BIND, _HELPERS]
    for n, text in texts.items():
        for head in (_PRELUDE, _PARTS):
            if text.startswith(head):
                text = text[len(head):]
                break
        out.append(f"redis.register_function('{names[n]}', function(k, a)\nbind(k, a)\n{text}end)\n")
    return lib, "".join(out), names

__all__ = ["ARRIVE", "CAPACITY", "CIRCUIT", "CIRCUIT_RESET", "CLEAR", "COOLDOWN", "DELIVER", "DELIVER_MANY", "FLOW", "INIT", "OUTBOX", "PEEK", "PUT_BACK",
           "QUARANTINE", "READ", "RECONCILE", "REMOVE", "RENEW", "SENDERS", "SIZE", "TAKE"]
