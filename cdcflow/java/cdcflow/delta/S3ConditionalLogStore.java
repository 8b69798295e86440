package cdcflow.delta;

import java.io.IOException;
import java.lang.reflect.Method;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.FileAlreadyExistsException;
import java.util.Iterator;

import io.delta.storage.HadoopFileSystemLogStore;
import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import software.amazon.awssdk.core.sync.RequestBody;
import software.amazon.awssdk.services.s3.S3Client;
import software.amazon.awssdk.services.s3.model.PutObjectRequest;
import software.amazon.awssdk.services.s3.model.S3Exception;

/**
 * A Delta log store for S3 that is safe across processes and engines: a commit file
 * (_delta_log/N.json) is written with one PutObject carrying {@code If-None-Match: *}, so S3 stores
 * it only if no N.json exists yet. Of two writers committing version N at once (two Spark jobs, or
 * Spark and delta-rs, which commits the same way), exactly one succeeds; the other gets
 * FileAlreadyExistsException, which Delta treats as a lost race: it reads the winner's commit, checks
 * for conflicts and retries at N+1. Delta's own S3SingleDriverLogStore only excludes writers inside
 * one driver (a JVM lock), and its S3DynamoDBLogStore does not exclude delta-rs 1.x, which dropped
 * the DynamoDB lock for conditional writes.
 *
 * Reads and listings go through the Hadoop file system (S3A). The PUT uses S3A's own SDK v2 client
 * (same endpoint, path style, credentials and retries as the file system); the header is set as a
 * raw header so any SDK v2 version works (Glue 5.1's included). Compiled with --release 8 against
 * delta-storage's LogStore API, which Delta 3.3 (Glue 5.1) and 4.0 share.
 */
public class S3ConditionalLogStore extends HadoopFileSystemLogStore {
  // S3 answers 409 ConditionalRequestConflict while another conditional write of the same key is in
  // flight: the outcome is unknown, so ask again (the retry then gets 200 or 412).
  private static final int CONFLICT_RETRIES = 20;

  public S3ConditionalLogStore(Configuration initHadoopConf) {
    super(initHadoopConf);
  }

  @Override
  public void write(Path path, Iterator<String> actions, Boolean overwrite, Configuration hadoopConf)
      throws IOException {
    FileSystem fs = path.getFileSystem(hadoopConf);
    Path resolved = fs.makeQualified(path);
    byte[] body = join(actions);
    if (overwrite) {
      // Only _last_checkpoint and similar hints are overwritten; one PUT is atomic on S3.
      try (FSDataOutputStream out = fs.create(resolved, true)) {
        out.write(body);
      }
      return;
    }
    URI uri = resolved.toUri();
    String key = uri.getPath().startsWith("/") ? uri.getPath().substring(1) : uri.getPath();
    PutObjectRequest request = PutObjectRequest.builder()
        .bucket(uri.getHost())
        .key(key)
        .overrideConfiguration(o -> o.putHeader("If-None-Match", "*"))
        .build();
    S3Client s3 = client(fs);
    for (int attempt = 0; ; attempt++) {
      try {
        s3.putObject(request, RequestBody.fromBytes(body));
        return;
      } catch (S3Exception e) {
        if (e.statusCode() == 412) {
          throw new FileAlreadyExistsException(resolved.toString());
        }
        if (e.statusCode() == 409 && attempt < CONFLICT_RETRIES) {
          sleep(50L * (attempt + 1));
          continue;
        }
        throw new IOException("conditional PUT of " + resolved + " failed: " + e.getMessage(), e);
      }
    }
  }

  @Override
  public Boolean isPartialWriteVisible(Path path, Configuration hadoopConf) {
    return false;  // one PUT: readers see the whole object or none
  }

  /** S3A's SDK v2 client (Hadoop 3.4+: S3AFileSystem.getS3AInternals().getAmazonS3Client). */
  static S3Client client(FileSystem fs) throws IOException {
    try {
      Object internals = fs.getClass().getMethod("getS3AInternals").invoke(fs);
      // Through the public interface: the implementation is a private inner class.
      Class<?> api = Class.forName("org.apache.hadoop.fs.s3a.S3AInternals", false, fs.getClass().getClassLoader());
      Method get = api.getMethod("getAmazonS3Client", String.class);
      return (S3Client) get.invoke(internals, "cdcflow Delta commit (conditional PUT)");
    } catch (ReflectiveOperationException | ClassCastException e) {
      throw new IOException("cdcflow.delta.S3ConditionalLogStore needs Hadoop's S3A file system (3.4+) with "
          + "the AWS SDK v2; " + fs.getClass().getName() + " has no S3 client to use", e);
    }
  }

  private static byte[] join(Iterator<String> actions) {
    StringBuilder sb = new StringBuilder();
    while (actions.hasNext()) {
      sb.append(actions.next()).append('\n');
    }
    return sb.toString().getBytes(StandardCharsets.UTF_8);
  }

  private static void sleep(long millis) throws IOException {
    try {
      Thread.sleep(millis);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new java.io.InterruptedIOException("interrupted while retrying a conditional PUT");
    }
  }
}
