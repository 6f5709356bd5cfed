#!/bin/bash
# Run inside the 6.1 lab guest by capture_hist.py: hist triggers + a synthetic latency event, then removal.
set -x
T=/sys/kernel/tracing
I=$T/instances/kpe_hist
say() { echo "===== $1 ====="; }
mkdir $I
echo 'p:kpe_hist/vread vfs_read count=%dx:u64 comm=$comm:string' >> $T/kprobe_events
echo 'r:kpe_hist/vread_ret vfs_read ret=$retval:s64' >> $T/kprobe_events
echo 'kpe_hist_vread_lat u64 lat; int pid' >> $T/synthetic_events
cat $T/synthetic_events > $LAB_OUT/synthetic_events.txt
echo 'hist:keys=common_pid:ts0=common_timestamp' >> $I/events/kpe_hist/vread/trigger
echo 'hist:keys=common_pid:lat=common_timestamp-$ts0:onmatch(kpe_hist.vread).trace(kpe_hist_vread_lat,$lat,common_pid)' >> $I/events/kpe_hist/vread_ret/trigger
cat $I/error_log > $LAB_OUT/error_log_1.txt
echo 'hist:keys=lat.log2:vals=hitcount,lat:sort=lat' >> $I/events/synthetic/kpe_hist_vread_lat/trigger
echo 'hist:keys=lat.buckets=1000:vals=hitcount,lat:sort=lat' >> $I/events/synthetic/kpe_hist_vread_lat/trigger
echo 'hist:keys=comm:vals=hitcount,count' >> $I/events/kpe_hist/vread/trigger
echo 'hist:keys=comm,count:vals=hitcount:size=8' >> $I/events/kpe_hist/vread/trigger 2>> $LAB_OUT/size8.err
cat $I/error_log > $LAB_OUT/error_log_2.txt
echo 'hist:keys=common_pid.execname,ret:vals=hitcount' >> $I/events/kpe_hist/vread_ret/trigger
echo 1 > $I/events/kpe_hist/vread/enable
echo 1 > $I/events/kpe_hist/vread_ret/enable
echo 1 > $I/tracing_on
dd if=/dev/zero of=/dev/null bs=1 count=1000 2>/dev/null
dd if=/dev/zero of=/dev/null bs=4096 count=300 2>/dev/null
for i in 1 2 3; do head -c 100 /proc/version > /dev/null; done
echo 0 > $I/events/kpe_hist/vread/enable
echo 0 > $I/events/kpe_hist/vread_ret/enable
cat $I/events/kpe_hist/vread/trigger > $LAB_OUT/vread.trigger
cat $I/events/kpe_hist/vread/hist > $LAB_OUT/vread.hist
cat $I/events/kpe_hist/vread_ret/hist > $LAB_OUT/vread_ret.hist
cat $I/events/synthetic/kpe_hist_vread_lat/hist > $LAB_OUT/lat.hist
cat $I/events/synthetic/kpe_hist_vread_lat/trigger > $LAB_OUT/lat.trigger
cat $I/error_log > $LAB_OUT/error_log_3.txt
# a mismatched synthetic field type, for the error text
echo 'kpe_hist_bad u64 lat; pid_t pid' >> $T/synthetic_events
echo 'hist:keys=common_pid:lat2=common_timestamp-$ts0:onmatch(kpe_hist.vread).trace(kpe_hist_bad,$lat2,common_pid)' >> $I/events/kpe_hist/vread_ret/trigger
cat $I/error_log > $LAB_OUT/error_log_4.txt
# removal: triggers in reverse, then synthetic, then instance, then probes
for f in $I/events/synthetic/kpe_hist_vread_lat/trigger; do grep -v '^#' $f | sed 's/ \[active\]$//;s/^/!/' | tac > /tmp/rm; while read -r l; do echo "$l" >> $f; done < /tmp/rm; done
for f in $I/events/kpe_hist/vread_ret/trigger $I/events/kpe_hist/vread/trigger; do grep -v '^#' $f | sed 's/ \[active\]$//;s/^/!/' | tac > /tmp/rm; cat /tmp/rm >> $LAB_OUT/removed.txt; while read -r l; do echo "$l" >> $f 2>>$LAB_OUT/rm.err; done < /tmp/rm; done
echo '!kpe_hist_vread_lat' >> $T/synthetic_events
echo '!kpe_hist_bad' >> $T/synthetic_events
rmdir $I
echo '-:kpe_hist/vread' >> $T/kprobe_events
echo '-:kpe_hist/vread_ret' >> $T/kprobe_events
cat $T/kprobe_events $T/synthetic_events > $LAB_OUT/left.txt
uname -r > $LAB_OUT/uname.txt
