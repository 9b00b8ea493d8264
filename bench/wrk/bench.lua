-- wrk script of `python -m bench`. No per-request Lua (keeps wrk's own cost low).
--
-- Environment (so that no secret is on a command line):
--   BENCH_COOKIE      optional Cookie header value (the session)
--   BENCH_BODY_BYTES  optional: POST a body of this many bytes (application/octet-stream)
-- At the end it prints one line "WRKJSON {...}" with counts and latency percentiles (us).

function init(args)
   local cookie = os.getenv("BENCH_COOKIE")
   if cookie ~= nil and cookie ~= "" then
      wrk.headers["Cookie"] = cookie
   end
   local size = tonumber(os.getenv("BENCH_BODY_BYTES") or "")
   if size ~= nil and size > 0 then
      wrk.method = "POST"
      wrk.headers["Content-Type"] = "application/octet-stream"
      wrk.body = string.rep("x", size)
   end
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
      '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
