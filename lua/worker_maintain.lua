-- worker_maintain (sync worker; standalone, no _lib.lua prelude): trims one stream below what
-- every group still needs and reports this group's lag, in one step so the two agree.
-- A group with pending entries needs its lowest pending id; one without needs what comes after
-- its last-delivered id. XTRIM MINID keeps ids >= the floor, so nothing unacked is ever trimmed.
-- Returns {trimmed, undelivered, pending, oldest unacked ms (-1 none), now ms}.
local stream = KEYS[1]
local group = ARGV[1]
local trim = ARGV[2] == '1'

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', stream) == 0 then return {0, 0, 0, -1, now_ms} end
local floor = nil
local undelivered, pending, oldest = 0, 0, -1
for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local need = info['last-delivered-id']
  local low = nil
  if info['pending'] > 0 then
    low = redis.call('XPENDING', stream, info['name'])[2]
    need = low
  end
  if floor == nil or less(need, floor) then floor = need end
  if info['name'] == group then
    pending = info['pending']
    if info['lag'] then undelivered = info['lag'] end
    local first = low
    if first == nil then
      local nxt = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
      if #nxt > 0 then first = nxt[1][1] end
    end
    if first ~= nil then oldest = parse(first) end
  end
end
local trimmed = 0
if floor ~= nil and trim then
  trimmed = redis.call('XTRIM', stream, 'MINID', floor)
end
return {trimmed, undelivered, pending, oldest, now_ms}
