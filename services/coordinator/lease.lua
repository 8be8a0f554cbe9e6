-- Every transition of the GPU lease, as one atomic script.
--
-- The clock is Redis' own (TIME), in milliseconds, for every timestamp and deadline
-- (a test may give its own, ARGV 9, to step through grace periods without waiting).
-- Each call first brings the state up to date (expiry, dead waiters, grant to the
-- head of the queue, yield requests and revocation), then does its operation.
-- It returns a JSON object: {now, events, next_at, ...}. cjson writes an empty
-- list as {}, so readers must accept both.
--
-- KEYS: 1 lease (hash)  2 fence (counter)  3 epoch  4 interactive queue (zset)
--       5 batch queue (zset)  6 waiters (hash id -> json)  7 history (list)
--       8 arrival counter  9 meta (hash)
-- ARGV: 1 op  2 epoch expected by the caller  3 max_batch_wait_ms  4 yield_grace_ms
--       5 history_size  6 max_queue  7 min_fence (highest fence the caller has seen)
--       8 key prefix (for the per-lease "ended" markers)
--       9 the time in ms ('' in production: Redis' TIME; a test's clock otherwise)
--       10.. op arguments
--
-- Device memory: the card's size (meta card_mb, 0 when unknown: a CPU) and each
-- holder's declared need (meta vram:<holder>, from its last request) decide whether
-- a holder must free its device memory when it releases (free_memory). It must when
-- its need plus the largest need of any other holder exceeds the card; never on a
-- card of unknown size.

redis.replicate_commands()

local K_LEASE, K_FENCE, K_EPOCH, K_QI, K_QB, K_WAITERS, K_HISTORY, K_SEQ, K_META =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

local op = ARGV[1]
local max_batch_wait = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local history_size = tonumber(ARGV[5])
local max_queue = tonumber(ARGV[6])
local min_fence = tonumber(ARGV[7])
local prefix = ARGV[8]

local now = tonumber(ARGV[9])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local events = {}

local function emit(kind, fence, holder, priority, extra)
  local e = {type = kind, fence = fence or cjson.null, holder = holder, priority = priority, at = now}
  if extra then
    for k, v in pairs(extra) do e[k] = v end
  end
  events[#events + 1] = e
end

local function reply(body)
  body.now = now
  body.queue_len = redis.call('ZCARD', K_QI) + redis.call('ZCARD', K_QB)
  body.events = events
  return cjson.encode(body)
end

if op == 'init' then
  -- ARGV 10: epoch to create if none  11: epoch this coordinator knew ('' if none)
  --      12: quarantine length in ms when the data was lost  13: waiter heartbeat ms
  --      14: the card's memory in MB (0: unknown)  15: guaranteed batch slice in ms
  --      16: a holder's turn in ms (see outranked)  17: an interactive holder's least hold in ms
  redis.call('HSET', K_META, 'card_mb', ARGV[14], 'batch_slice_ms', ARGV[15], 'turn_ms', ARGV[16],
    'min_hold_ms', ARGV[17] or '0')
  local stored = redis.call('GET', K_EPOCH)
  if stored then
    -- A (re)starting coordinator: queued waiters could not refresh their heartbeat
    -- while none ran, so each gets one fresh heartbeat window to come back.
    local window = now + tonumber(ARGV[13])
    local flat = redis.call('HGETALL', K_WAITERS)
    for i = 1, #flat, 2 do
      local w = cjson.decode(flat[i + 1])
      if not w.granted and w.hb_until < window then
        w.hb_until = window
        redis.call('HSET', K_WAITERS, flat[i], cjson.encode(w))
      end
    end
    local quarantine = tonumber(redis.call('HGET', K_META, 'quarantine_until') or '0')
    return reply({epoch = stored, quarantine_until = quarantine, lost = false})
  end
  -- No epoch: a new Redis, or one that lost our data. Fences continue above the
  -- counter, above what the caller saw, and above the clock (covers both).
  local counter = tonumber(redis.call('GET', K_FENCE) or '0')
  local floor = math.max(counter, min_fence, now)
  redis.call('SET', K_FENCE, string.format('%d', floor))
  redis.call('SET', K_EPOCH, ARGV[10])
  local lost = ARGV[11] ~= ''
  local quarantine = 0
  if lost then quarantine = now + tonumber(ARGV[12]) end
  redis.call('HSET', K_META, 'quarantine_until', string.format('%d', quarantine))
  return reply({epoch = ARGV[10], quarantine_until = quarantine, lost = lost})
end

if redis.call('GET', K_EPOCH) ~= ARGV[2] then
  return cjson.encode({error = 'epoch', now = now})
end

local function lease_get()
  local flat = redis.call('HGETALL', K_LEASE)
  if #flat == 0 then return nil end
  local l = {}
  for i = 1, #flat, 2 do l[flat[i]] = flat[i + 1] end
  for _, k in ipairs({'fence', 'ttl_ms', 'requested_at', 'granted_at', 'expires_at',
                      'yield_requested', 'revoke_at', 'revoked', 'vram_mb', 'free_memory',
                      'slice_until', 'waited'}) do
    l[k] = tonumber(l[k] or '0')
  end
  return l
end

local function meta_number(field)
  return tonumber(redis.call('HGET', K_META, field) or '0') or 0
end

-- 1 when this holder must free its device memory on release, else 0.
local function must_free(holder, vram_mb)
  local card = meta_number('card_mb')
  if card <= 0 then return 0 end
  local others = 0
  local flat = redis.call('HGETALL', K_META)
  for i = 1, #flat, 2 do
    local name = flat[i]
    if string.sub(name, 1, 5) == 'vram:' and string.sub(name, 6) ~= holder then
      others = math.max(others, tonumber(flat[i + 1]) or 0)
    end
  end
  if vram_mb + others > card then return 1 end
  return 0
end

local function public_lease(l)
  return {lease_id = l.lease_id, fence = l.fence, holder = l.holder, priority = l.priority,
          ttl_ms = l.ttl_ms, requested_at = l.requested_at, granted_at = l.granted_at,
          expires_at = l.expires_at, waited_ms = l.granted_at - l.requested_at,
          yield_requested = l.yield_requested == 1, revoked = l.revoked == 1,
          vram_mb = l.vram_mb, free_memory = l.free_memory == 1}
end

local function waiter_get(id)
  local raw = redis.call('HGET', K_WAITERS, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

-- how: the history's end (released | expired | revoked); event: what just happened
-- (released | expired). A revoked lease ends as 'revoked' whichever way it ends.
-- handover, handover_ms: what the holder did with the device when it released
-- (pause, checkpoint, restart, unload, offload, keep), and how long that took.
local function end_lease(l, event, handover, handover_ms)
  local how = event
  if l.revoked == 1 then how = 'revoked' end
  redis.call('DEL', K_LEASE)
  redis.call('HDEL', K_WAITERS, l.waiter)
  redis.call('SET', prefix .. 'ended:' .. l.lease_id, how, 'PX', 600000)
  local record = {fence = l.fence, holder = l.holder, priority = l.priority,
                  requested_at = l.requested_at, granted_at = l.granted_at,
                  ended_at = now, ['end'] = how, vram_mb = l.vram_mb,
                  free_memory = l.free_memory == 1}
  if handover and handover ~= '' then
    record.handover = handover
    record.handover_ms = tonumber(handover_ms)
  end
  redis.call('LPUSH', K_HISTORY, cjson.encode(record))
  redis.call('LTRIM', K_HISTORY, 0, history_size - 1)
  if l.priority == 'batch' then
    local field = 'waited:' .. l.holder
    local preempted = redis.call('ZCARD', K_QI) > 0
    if preempted and now - l.granted_at < meta_number('batch_slice_ms') then
      redis.call('HSET', K_META, field, string.format('%d', l.waited))
    else
      redis.call('HDEL', K_META, field)
    end
  end
  emit(event, l.fence, l.holder, l.priority, {['end'] = how})
end

local function queue_of(priority)
  if priority == 'interactive' then return K_QI end
  return K_QB
end

local function drop_waiter(id, w, reason)
  redis.call('ZREM', queue_of(w.priority), id)
  redis.call('HDEL', K_WAITERS, id)
  emit('left_queue', nil, w.holder, w.priority, {reason = reason})
end

-- How long a batch waiter has waited in all since it last had the card for a whole
-- slice: grants cut short by interactive waiters carry their waiting over (waited_before),
-- or a stream of chats could hand it the card for milliseconds forever. Only time spent
-- waiting counts: a job that holds the card most of the time between chats is not starving.
local function waited(w)
  return (w.waited_before or 0) + now - w.requested_at
end

local function starving(w)
  return w ~= nil and w.priority == 'batch' and waited(w) >= max_batch_wait
end

-- The waiter that goes next: a starving batch waiter, else the first interactive,
-- else the first batch waiter.
local function head()
  local b = redis.call('ZRANGE', K_QB, 0, 0)[1]
  local bw = b and waiter_get(b)
  if bw and starving(bw) then return b, bw end
  local i = redis.call('ZRANGE', K_QI, 0, 0)[1]
  if i then return i, waiter_get(i) end
  if b then return b, bw end
  return nil, nil
end

local function next_fence()
  local f = redis.call('INCR', K_FENCE)
  if f <= min_fence then
    f = min_fence + 1
    redis.call('SET', K_FENCE, string.format('%d', f))
  end
  return f
end

local function grant(id, w)
  local fence = next_fence()
  local vram = w.vram_mb or 0
  -- A batch waiter granted because it starved keeps the card for a guaranteed slice:
  -- nobody is asked for it back before then, so a stream of chats cannot hold it at 0 %.
  local slice_until = 0
  if w.priority == 'batch' and starving(w) then slice_until = now + meta_number('batch_slice_ms') end
  local l = {lease_id = w.lease_id, fence = fence, holder = w.holder, priority = w.priority,
             ttl_ms = w.ttl_ms, requested_at = w.requested_at, granted_at = now,
             expires_at = now + w.ttl_ms, yield_requested = 0, revoke_at = 0, revoked = 0,
             waiter = id, vram_mb = vram, free_memory = must_free(w.holder, vram),
             slice_until = slice_until, waited = waited(w)}
  redis.call('HSET', K_LEASE,
    'lease_id', l.lease_id, 'fence', string.format('%d', fence), 'holder', l.holder,
    'priority', l.priority, 'ttl_ms', l.ttl_ms, 'requested_at', string.format('%d', l.requested_at),
    'granted_at', string.format('%d', now), 'expires_at', string.format('%d', l.expires_at),
    'yield_requested', 0, 'revoke_at', 0, 'revoked', 0, 'waiter', id,
    'vram_mb', string.format('%d', vram), 'free_memory', l.free_memory,
    'slice_until', string.format('%d', slice_until), 'waited', string.format('%d', l.waited))
  redis.call('ZREM', queue_of(w.priority), id)
  -- The record stays (marked granted) while the lease lives, so that a caller whose
  -- connection broke can ask again with the same waiter id and get this grant.
  w.granted = true
  redis.call('HSET', K_WAITERS, id, cjson.encode(w))
  -- waiter and lease_id let the coordinator answer the waiting caller at once;
  -- it strips them before the event leaves the process.
  emit('granted', fence, l.holder, l.priority,
       {waiter = id, lease_id = l.lease_id, ttl_ms = l.ttl_ms, requested_at = l.requested_at,
        granted_at = now, expires_at = l.expires_at, waited_ms = now - l.requested_at,
        vram_mb = vram, free_memory = l.free_memory == 1})
  return l
end

-- Whether someone waiting should have the card now rather than after the holder's
-- turn: an interactive waiter outranks a batch holder, and any interactive holder of
-- another service (a chat during an upload) once that one has held the card for its
-- least hold (meta min_hold_ms); a starving batch waiter outranks everyone. Anyone else
-- (a second upload of the same service, a job behind an upload or an idle LLM) asks once
-- the holder has had the card for a turn (meta turn_ms): holders that pause at once
-- would otherwise swap the card every few milliseconds. The least hold is that rule for
-- two services that both serve users: in the soak the batching LLM and an upload, each
-- asked to yield the instant it was granted, swapped the card every 10-40 ms and got
-- next to nothing done between swaps.
local function outranked(l)
  local b = redis.call('ZRANGE', K_QB, 0, 0)[1]
  if b and starving(waiter_get(b)) then return true end
  local held_enough = now >= l.granted_at + meta_number('min_hold_ms')
  for _, id in ipairs(redis.call('ZRANGE', K_QI, 0, -1)) do
    local w = waiter_get(id)
    if w and (l.priority == 'batch' or (w.holder ~= l.holder and held_enough)) then return true end
  end
  return false
end

local function advance()
  local l = lease_get()
  if l and now >= l.expires_at then
    end_lease(l, 'expired')
    l = nil
  end

  local next_at = 0
  local function soon(at)
    if at and at > 0 and (next_at == 0 or at < next_at) then next_at = at end
  end

  for _, q in ipairs({K_QI, K_QB}) do
    for _, id in ipairs(redis.call('ZRANGE', q, 0, -1)) do
      local w = waiter_get(id)
      if not w then
        redis.call('ZREM', q, id)
      elseif w.hb_until < now then
        drop_waiter(id, w, 'heartbeat')
      else
        soon(w.hb_until)
      end
    end
  end

  local quarantine = tonumber(redis.call('HGET', K_META, 'quarantine_until') or '0')
  if not l then
    if now >= quarantine then
      local id, w = head()
      if id then l = grant(id, w) end
    elseif redis.call('ZCARD', K_QI) + redis.call('ZCARD', K_QB) > 0 then
      soon(quarantine)
    end
  end

  if l then
    soon(l.expires_at)
    local interactive = redis.call('ZCARD', K_QI)
    local batch = redis.call('ZCARD', K_QB)
    local in_slice = now < l.slice_until
    if in_slice and l.revoked == 0 and interactive + batch > 0 then
      soon(l.slice_until)
    elseif l.revoked == 0 and interactive + batch > 0 and l.yield_requested == 0
        and now < l.granted_at + meta_number('turn_ms') and not outranked(l) then
      soon(l.granted_at + meta_number('turn_ms'))
      if now < l.granted_at + meta_number('min_hold_ms') then soon(l.granted_at + meta_number('min_hold_ms')) end
    elseif l.revoked == 0 and interactive + batch > 0 then
      -- The table of needs may have grown since the grant (a new service asked).
      local free = must_free(l.holder, l.vram_mb)
      if l.yield_requested == 0 or free ~= l.free_memory then
        l.yield_requested = 1
        l.free_memory = free
        redis.call('HSET', K_LEASE, 'yield_requested', 1, 'free_memory', free)
        emit('yield_requested', l.fence, l.holder, l.priority, {free_memory = free == 1})
      end
      -- Whoever waits, whatever their priority, starts the grace period: a holder
      -- that keeps the card past it is revoked (its lease then runs out at its TTL).
      if l.revoke_at == 0 then
        l.revoke_at = now + grace
        redis.call('HSET', K_LEASE, 'revoke_at', string.format('%d', l.revoke_at))
      end
      if now >= l.revoke_at then
        l.revoked = 1
        redis.call('HSET', K_LEASE, 'revoked', 1)
        emit('revoked', l.fence, l.holder, l.priority)
      else
        soon(l.revoke_at)
      end
    elseif l.revoked == 0 and l.yield_requested == 1 then
      -- Everyone who waited has gone: the holder may keep the card.
      l.yield_requested = 0
      l.revoke_at = 0
      redis.call('HSET', K_LEASE, 'yield_requested', 0, 'revoke_at', 0)
    end
  end
  return l, next_at, quarantine
end

local function queue_view()
  local out = {}
  local seen = {}
  local function add(id)
    if seen[id] then return end
    seen[id] = true
    local w = waiter_get(id)
    if w then
      out[#out + 1] = {holder = w.holder, priority = w.priority, waiting_ms = now - w.requested_at}
    end
  end
  local id = head()
  if id then add(id) end
  for _, q in ipairs({K_QI, K_QB}) do
    for _, qid in ipairs(redis.call('ZRANGE', q, 0, -1)) do add(qid) end
  end
  return out
end

local function gone(lease_id)
  local how = redis.call('GET', prefix .. 'ended:' .. lease_id)
  return reply({gone = how or 'unknown'})
end

if op == 'advance' then
  local l, next_at, quarantine = advance()
  return reply({next_at = next_at, quarantine_until = quarantine})
end

if op == 'enqueue' then
  -- ARGV 10 waiter id  11 holder  12 priority  13 ttl_ms  14 heartbeat ms  15 lease id
  --      16 the device memory the holder needs, in MB (0: none declared)
  local id = ARGV[10]
  local w = waiter_get(id)
  if not w and redis.call('EXISTS', prefix .. 'withdrawn:' .. id) == 1 then
    local _, next_w = advance()
    return reply({withdrawn = true, next_at = next_w})
  end
  if w then
    if not w.granted then
      w.hb_until = now + tonumber(ARGV[14])
      redis.call('HSET', K_WAITERS, id, cjson.encode(w))
    end
  else
    if redis.call('ZCARD', K_QI) + redis.call('ZCARD', K_QB) >= max_queue then
      local l0, next0 = advance()
      return reply({full = true, next_at = next0})
    end
    w = {holder = ARGV[11], priority = ARGV[12], ttl_ms = tonumber(ARGV[13]), requested_at = now,
         hb_until = now + tonumber(ARGV[14]), lease_id = ARGV[15], vram_mb = tonumber(ARGV[16]) or 0}
    if w.priority == 'batch' then
      w.waited_before = tonumber(redis.call('HGET', K_META, 'waited:' .. w.holder) or '0')
    end
    redis.call('HSET', K_META, 'vram:' .. w.holder, string.format('%d', w.vram_mb))
    local seq = redis.call('INCR', K_SEQ)
    redis.call('ZADD', queue_of(w.priority), seq, id)
    redis.call('HSET', K_WAITERS, id, cjson.encode(w))
    emit('queued', nil, w.holder, w.priority)
  end
  local l, next_at = advance()
  local body = {next_at = next_at}
  if l and l.waiter == id then body.grant = public_lease(l) end
  return reply(body)
end

if op == 'leave' then
  -- ARGV 10 waiter id  11 mode: 'take' returns a grant made in the meantime,
  -- 'cancel' releases it (the caller is gone), 'withdraw' too, for a caller that took
  -- its ask back and may not have seen the grant (ARGV 12: how long, in ms, an enqueue
  -- of this id is refused afterwards: its request may reach the store after this).
  local id, mode = ARGV[10], ARGV[11]
  if mode == 'withdraw' then
    redis.call('SET', prefix .. 'withdrawn:' .. id, '1', 'PX', tonumber(ARGV[12]))
  end
  local l = lease_get()
  local body = {}
  if l and l.waiter == id and now < l.expires_at then
    if mode == 'take' then
      body.grant = public_lease(l)
    else
      end_lease(l, 'released')
    end
  else
    local w = waiter_get(id)
    if w and not w.granted then drop_waiter(id, w, mode == 'cancel' and 'disconnected' or 'timeout') end
  end
  local _, next_at = advance()
  body.next_at = next_at
  return reply(body)
end

if op == 'heartbeat' then
  -- ARGV 10 heartbeat ms  11.. waiter ids
  local until_ = now + tonumber(ARGV[10])
  for i = 11, #ARGV do
    local w = waiter_get(ARGV[i])
    if w and not w.granted then
      w.hb_until = until_
      redis.call('HSET', K_WAITERS, ARGV[i], cjson.encode(w))
    end
  end
  local _, next_at = advance()
  return reply({next_at = next_at})
end

if op == 'renew' then
  -- ARGV 10 lease id
  local l, next_at = advance()
  if not l or l.lease_id ~= ARGV[10] then return gone(ARGV[10]) end
  if l.revoked == 1 then return reply({gone = 'revoked'}) end
  l.expires_at = now + l.ttl_ms
  redis.call('HSET', K_LEASE, 'expires_at', string.format('%d', l.expires_at))
  return reply({fence = l.fence, expires_at = l.expires_at, yield_requested = l.yield_requested == 1,
                free_memory = l.free_memory == 1, next_at = next_at})
end

if op == 'release' then
  -- ARGV 10 lease id  11 hand-over path ('' if not reported)  12 its duration in ms.
  -- One advance, after the release: it also expires and grants.
  local l = lease_get()
  if not l or l.lease_id ~= ARGV[10] or now >= l.expires_at then
    advance()
    return gone(ARGV[10])
  end
  end_lease(l, 'released', ARGV[11], ARGV[12])
  local _, next_at = advance()
  return reply({released = true, next_at = next_at})
end

if op == 'status' then
  local l, next_at, quarantine = advance()
  local body = {queue = queue_view(), quarantine_until = quarantine, next_at = next_at}
  if l then body.lease = public_lease(l) end
  return reply(body)
end

if op == 'history' then
  -- ARGV 10 limit
  local l, next_at = advance()
  local limit = tonumber(ARGV[10])
  local items = {}
  if l and limit > 0 then
    items[1] = {fence = l.fence, holder = l.holder, priority = l.priority, requested_at = l.requested_at,
                granted_at = l.granted_at, ended_at = cjson.null, ['end'] = cjson.null}
  end
  local wanted = limit - #items
  if wanted > 0 then
    for _, raw in ipairs(redis.call('LRANGE', K_HISTORY, 0, wanted - 1)) do items[#items + 1] = cjson.decode(raw) end
  end
  return reply({history = items, next_at = next_at})
end

return cjson.encode({error = 'unknown op ' .. tostring(op), now = now})
