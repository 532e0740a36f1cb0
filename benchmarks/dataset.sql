-- The reference data set of issue 12 and shared/notes/timescaledb-anchor.md: devices x 10
-- metrics x 1 sample/s, 0-19 ms of timestamp jitter per (device, second), ids node-N, 2 of
-- 10 metrics with an _device_alias label.  This is the anchor's generator, writing into a
-- table instead of a CSV file.  psql variables: devices, seconds.
SET TIME ZONE 'UTC';
SET jit = off;
SELECT setseed(0.42);
DROP TABLE IF EXISTS gen_dev, gen_metric, gen_rows;
CREATE UNLOGGED TABLE gen_dev AS
SELECT d, 'node-' || d AS dev,
       100 + random() * 150 AS pbase, (random() * 1200)::int AS phase,
       (10 ^ (3 + random() * 4)) AS r_in, (10 ^ (3 + random() * 4)) AS r_out, (10 ^ (2 + random() * 5)) AS r_disk,
       (random() * 1e12)::bigint AS c_in, (random() * 1e12)::bigint AS c_out, (random() * 1e11)::bigint AS c_disk,
       4800 + (random() * 12)::int * 100 AS fan, 35 + random() * 10 AS t0,
       (ARRAY[68719476736, 137438953472, 274877906944])[1 + (random() * 2)::int]::bigint AS memtotal
FROM generate_series(1, :devices) d;
CREATE UNLOGGED TABLE gen_metric(mi int, name text);
INSERT INTO gen_metric VALUES
 (1,'bmc_node_power_watt'),(2,'wattmetre_power_watt'),(3,'pdu_outlet_power_watt'),
 (4,'prom_node_network_receive_bytes_total'),(5,'prom_node_network_transmit_bytes_total'),
 (6,'prom_node_disk_read_bytes_total'),(7,'bmc_temp_cpu_celsius'),(8,'bmc_fan_speed_rpm'),
 (9,'bmc_psu_input_voltage_volt'),(10,'prom_node_memory_MemTotal_bytes');
CREATE UNLOGGED TABLE gen_rows AS
 SELECT g.ts AS "timestamp", g.dev AS device_id, m.name AS metric_id,
   CASE m.mi
     WHEN 1 THEN round((g.pbase + g.load + (random() - 0.5) * 6)::numeric, 1)::float8
     WHEN 2 THEN round((g.pbase * 1.05 + g.load + (random() - 0.5) * 4)::numeric, 1)::float8
     WHEN 3 THEN round((g.pbase * 1.08 + g.load + (random() - 0.5) * 2)::numeric, 0)::float8
     WHEN 4 THEN (g.c_in  + floor(g.r_in  * (g.s + 0.9 * random())))::float8
     WHEN 5 THEN (g.c_out + floor(g.r_out * (g.s + 0.9 * random())))::float8
     WHEN 6 THEN (g.c_disk + floor(g.r_disk * (g.s + 0.9 * random())))::float8
     WHEN 7 THEN round(g.t0 + g.load / 8 + (random() - 0.5) * 2)::float8
     WHEN 8 THEN (g.fan + CASE WHEN g.load > 60 THEN 600 ELSE 0 END)::float8
     WHEN 9 THEN 230.0::float8
     WHEN 10 THEN g.memtotal::float8
   END AS value,
   (CASE WHEN m.mi = 2 THEN '{"_device_alias":"wattmetre1-port' || g.d || '"}'
        WHEN m.mi = 3 THEN '{"_device_alias":"pdu-' || (g.d / 24) || '-port' || (g.d % 24) || '"}'
        ELSE '{}' END)::jsonb AS labels
 FROM generate_series(0, :seconds - 1) s
 CROSS JOIN LATERAL (
   SELECT s AS s, dd.*,
          timestamptz '2025-01-06 00:00:00+00' + (s * 1000 + floor(random() * 20)) * interval '1 millisecond' AS ts,
          CASE WHEN ((s + dd.phase) / 1200) % 3 <> 0
               THEN ((hashint8(dd.d * 100000 + (s + dd.phase) / 1200) & 1023) / 1023.0 * 120)::float8
               ELSE 0 END AS load
   FROM gen_dev dd WHERE s >= 0 OFFSET 0) g
 CROSS JOIN LATERAL (SELECT * FROM gen_metric mm WHERE g.d > 0 OFFSET 0) m;
