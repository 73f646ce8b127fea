-- worker_forget (sync worker; standalone, no _lib.lua prelude): forgets the consumers of one
-- group that hold nothing and have not read for a long time (dead pods), so the group does not
-- grow without bound. Only with 0 pending: deleting a consumer drops its pending entries.
-- Returns the number of consumers deleted.
local stream = KEYS[1]
local group = ARGV[1]
local idle_ms = tonumber(ARGV[2])
local own = ARGV[3]  -- this worker's own name, always kept

if redis.call('EXISTS', stream) == 0 then return 0 end
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['pending'] == 0 and info['idle'] > idle_ms and info['name'] ~= own then
    n = n + redis.call('XGROUP', 'DELCONSUMER', stream, group, info['name'])
  end
end
return n
